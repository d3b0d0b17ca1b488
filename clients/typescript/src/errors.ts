/** Errors from the agentid service: the gRPC code, and the google.rpc.ErrorInfo every status carries. */

import { Code, ConnectError } from "@connectrpc/connect";
import { BadRequestSchema, ErrorInfoSchema } from "./gen/google/rpc/error_details_pb.js";

/** One field of a malformed request (google.rpc.BadRequest), as INVALID_ARGUMENT names them. */
export interface FieldViolation {
  field: string;
  description: string;
}

/**
 * A failed call. `code` is the gRPC status code (Connect's `Code` enum has the gRPC numbers),
 * `codeName` its canonical name (e.g. "PERMISSION_DENIED"); `reason` and `metadata` come from
 * the google.rpc.ErrorInfo in the `grpc-status-details-bin` trailer (domain "agentid": a stable
 * UPPER_SNAKE reason such as SCOPE_ESCALATION, with metadata such as `scopes`); "" and {} when
 * the failure never reached agentid (a connection refused, a deadline passed locally).
 */
export class AgentIdError extends Error {
  readonly code: Code;
  readonly codeName: string;
  readonly reason: string;
  readonly domain: string;
  readonly metadata: Readonly<Record<string, string>>;
  readonly fieldViolations: readonly FieldViolation[];
  /** The server's message alone (no code or reason in front). */
  readonly rawMessage: string;

  constructor(
    code: Code,
    reason: string,
    rawMessage: string,
    options: {
      domain?: string;
      metadata?: Record<string, string>;
      fieldViolations?: FieldViolation[];
      cause?: unknown;
    } = {},
  ) {
    const codeName = grpcCodeName(code);
    super(`${codeName}${reason ? ` ${reason}` : ""}: ${rawMessage}`, { cause: options.cause });
    this.name = "AgentIdError";
    this.code = code;
    this.codeName = codeName;
    this.reason = reason;
    this.domain = options.domain ?? "";
    this.metadata = Object.freeze({ ...(options.metadata ?? {}) });
    this.fieldViolations = Object.freeze([...(options.fieldViolations ?? [])]);
    this.rawMessage = rawMessage;
  }

  /** The AgentIdError for anything a Connect call threw (an AgentIdError is returned as is). */
  static from(error: unknown): AgentIdError {
    if (error instanceof AgentIdError) return error;
    const connect = ConnectError.from(error);
    const [info] = connect.findDetails(ErrorInfoSchema);
    const violations = connect
      .findDetails(BadRequestSchema)
      .flatMap((detail) => detail.fieldViolations)
      .map(({ field, description }) => ({ field, description }));
    const code = connectionFailed(connect) ? Code.Unavailable : connect.code;
    return new AgentIdError(code, info?.reason ?? "", connect.rawMessage, {
      domain: info?.domain ?? "",
      metadata: info?.metadata ?? {},
      fieldViolations: violations,
      cause: error,
    });
  }
}

/**
 * The connection failed before or beneath the call (reset, a TLS certificate not trusted or not
 * naming the host, a handshake refused): UNAVAILABLE, as every gRPC client reports it and as
 * retry logic expects. Connect's Node transport calls some of these INTERNAL or ABORTED; a status
 * the server sent is never changed.
 */
function connectionFailed(error: ConnectError): boolean {
  if (error.code !== Code.Internal && error.code !== Code.Aborted && error.code !== Code.Unknown)
    return false;
  for (let cause: unknown = error.cause; cause instanceof Error; cause = cause.cause) {
    const code = (cause as { code?: unknown }).code;
    if (typeof code === "string" && NODE_CONNECTION_ERROR.test(code)) return true;
  }
  return false;
}

// Node's socket and TLS error codes (ECONNRESET, EPIPE, ERR_TLS_CERT_ALTNAME_INVALID,
// UNABLE_TO_VERIFY_LEAF_SIGNATURE, SELF_SIGNED_CERT_IN_CHAIN, CERT_HAS_EXPIRED, ERR_SSL_...).
const NODE_CONNECTION_ERROR =
  /^(E[A-Z]+|ERR_TLS_\w+|ERR_SSL_\w+|ERR_HTTP2_(GOAWAY_SESSION|SESSION_ERROR|STREAM_CANCEL|ERROR)|UNABLE_TO_\w+|\w*CERT\w*|DEPTH_ZERO_SELF_SIGNED_CERT)$/;

/** "PERMISSION_DENIED" for Code.PermissionDenied: the names gRPC and agentid's docs use. */
export function grpcCodeName(code: Code): string {
  const name = Code[code];
  if (name === undefined) return `CODE_${code}`;
  if (code === Code.Canceled) return "CANCELLED"; // gRPC spells it with two Ls
  return name.replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

export { Code };
