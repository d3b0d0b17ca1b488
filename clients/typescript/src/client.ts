/** A small client for the agentid service over gRPC (Connect's gRPC transport for Node). */

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { type Duration, DurationSchema, type FieldMask, FieldMaskSchema } from "@bufbuild/protobuf/wkt";
import {
  type CallOptions as ConnectCallOptions,
  type Client as ConnectClient,
  createClient,
  type Interceptor,
} from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import type { KeyObject } from "node:crypto";
import type { JSONWebKeySet } from "jose";
import { toContext } from "./context.js";
import { ProofSigner } from "./dpop.js";
import { AgentIdError, Code } from "./errors.js";
import {
  type Agent,
  AgentIdentityService,
  type AgentSchema,
  type AuditRecord,
  type AuditRequestSchema,
  type CheckResponse,
  type DelegateResponse,
  type DisableAgentResponse,
  type RetireSigningKeyResponse,
  type RevokeResponse,
  type Session,
  type StepUp,
  type VerifyAuditResponse,
  type WatchRevocationsResponse,
} from "./gen/agentid/v1/agentid_pb.js";
import { baseUrl, isLocalTarget } from "./target.js";
import { parseJwks } from "./tokens.js";

/** TLS to agentid: the CA that signed its certificate (else the system's), and this caller's
 * certificate and key where agentid wants mTLS; `servername` when it differs from the target. */
export interface TlsOptions {
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  servername?: string;
}

export interface ClientOptions {
  /** TLS (`true`: the system's CAs). Without it the connection is plaintext, allowed only to a
   * target on this machine (localhost, 127.0.0.0/8, ::1) unless `plaintext` is true. */
  tls?: TlsOptions | true;
  /** Send the credential in plaintext to a target that is not on this machine: only for a
   * network that encrypts by itself (a service mesh). */
  plaintext?: boolean;
  /** HTTP/2 keepalive: a PING every this many ms while the connection is open (default 30000;
   * agentid accepts one every 10 s), so a stream whose network path died fails and is resumed. */
  keepaliveIntervalMs?: number;
  /** How long an unanswered PING may wait before the connection is given up (default 10000). */
  keepaliveTimeoutMs?: number;
  /** For an agent token bound to the agent's key (Delegate's `jkt`): that private key (Ed25519
   * or P-256, a node:crypto KeyObject). Every call then carries a fresh DPoP proof of it
   * (RFC 9449), which agentid requires of a bound token. */
  proofKey?: KeyObject;
}

/** What every call takes: an AbortSignal to cancel it, a deadline in ms. */
export interface CallOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

export interface DelegateOptions extends CallOptions {
  /** Requested lifetime in seconds (the server clamps it); default the server's default_ttl. */
  ttlSeconds?: number;
  task?: string;
  audiences?: string[];
  /** RFC 7638 thumbprint of the agent's key, to bind the token to it (cnf.jkt). */
  jkt?: string;
  /** The agent's client assertion (RFC 7523), required when the agent has keys. */
  actorToken?: string;
}

export interface CheckOptions extends CallOptions {
  /** Facts for risk rules, e.g. `{ amount: 2500 }`: JSON only (see toContext). */
  context?: Record<string, unknown>;
  /** Wait until the server has applied this revocation sequence (from a RevokeResponse). */
  minRevocationSequence?: bigint | number;
  /** The DPoP proof the agent presented, its expected method and URL (a bound token). */
  popProof?: string;
  popMethod?: string;
  popUri?: string;
}

export interface StepUpOptions extends CallOptions {
  context?: Record<string, unknown>;
  /** The line shown to the human, as in OpenID CIBA. */
  bindingMessage?: string;
}

/** One target: a session (and its descendants), every live session of a user, or of an agent. */
export type RevokeTarget = { sessionId: string } | { userId: string } | { agentId: string };

export interface CreateAgentOptions extends CallOptions {
  displayName?: string;
  description?: string;
  owners?: string[];
  /** Its sessions' longest lifetime in seconds; default the server's tokens.max_ttl. */
  maxTtlSeconds?: number;
  /** The JWK Set its client assertions are signed with ("": none). */
  jwksJson?: string;
}

const KEEPALIVE_INTERVAL_MS = 30_000;
const KEEPALIVE_TIMEOUT_MS = 10_000;

/**
 * Calls agentid with one credential (a user's IdP token, an agent token or a service API key),
 * sent as `authorization: Bearer <credential>` with every call.
 *
 * The connection is TLS when `tls` is given; otherwise plaintext, which is allowed only to a
 * target on this machine: to any other, the constructor throws before anything is sent, unless
 * `plaintext: true` says the network encrypts by itself. Errors are AgentIdError. Call close()
 * when done (or declare it with `using`).
 */
export class Client {
  readonly target: string;
  readonly #options: ClientOptions;
  readonly #service: ConnectClient<typeof AgentIdentityService>;
  readonly #abort = new AbortController();
  readonly #session: Http2SessionManager;

  constructor(target: string, credential: string, options: ClientOptions = {}) {
    const tls = options.tls !== undefined;
    if (!tls && options.plaintext !== true && !isLocalTarget(target)) {
      throw new Error(
        `${target} is not on this machine: connect with TLS (tls: ...), or say plaintext: true ` +
          "if the network encrypts by itself; the credential would travel in the clear",
      );
    }
    if (!credential) throw new Error("a credential is needed (an IdP token, agent token or API key)");
    this.target = target;
    this.#options = options;
    const bearer: Interceptor = (next) => (request) => {
      request.header.set("authorization", `Bearer ${credential}`);
      return next(request);
    };
    const interceptors = [bearer];
    if (options.proofKey !== undefined) interceptors.push(dpop(options.proofKey, credential, target));
    const url = baseUrl(target, tls);
    const tlsOptions = options.tls === true ? {} : (options.tls ?? {});
    // One HTTP/2 connection per client, ours to close (close() ends it, so a process exits).
    this.#session = new Http2SessionManager(
      url,
      {
        pingIntervalMs: options.keepaliveIntervalMs ?? KEEPALIVE_INTERVAL_MS,
        pingTimeoutMs: options.keepaliveTimeoutMs ?? KEEPALIVE_TIMEOUT_MS,
      },
      tls ? { ...tlsOptions } : {},
    );
    const transport = createGrpcTransport({ baseUrl: url, interceptors, sessionManager: this.#session });
    this.#service = createClient(AgentIdentityService, transport);
  }

  /** A new client to the same target with the same options (TLS, keepalive), calling with
   * another credential; `proofKey` is not carried over (it belongs to one agent's token). Close
   * it when done. */
  withCredential(credential: string, options: { proofKey?: KeyObject } = {}): Client {
    const { proofKey: _, ...rest } = this.#options;
    return new Client(this.target, credential, { ...rest, ...options });
  }

  /** Cancels every call still open (streams included) and closes the connection. */
  close(): void {
    this.#abort.abort();
    this.#session.abort();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  /** A new agent session with a subset of the caller's scopes (a user, or an agent holding
   * agentid.delegate for a sub-agent). */
  async delegate(
    agentId: string,
    scopes: string[],
    options: DelegateOptions = {},
  ): Promise<DelegateResponse> {
    return this.#unary(
      (call) =>
        this.#service.delegate(
          {
            agentId,
            scopes,
            task: options.task ?? "",
            audiences: options.audiences ?? [],
            jkt: options.jkt ?? "",
            actorToken: options.actorToken ?? "",
            ...(options.ttlSeconds !== undefined ? { ttl: seconds(options.ttlSeconds) } : {}),
          },
          call,
        ),
      options,
    );
  }

  /** May the agent holding `token` do `action` on `resource`? (A service with role check.) */
  async check(
    token: string,
    action: string,
    resource = "",
    options: CheckOptions = {},
  ): Promise<CheckResponse> {
    const context = options.context === undefined ? undefined : toContext(options.context);
    return this.#unary(
      (call) =>
        this.#service.check(
          {
            token,
            action,
            resource,
            minRevocationSequence: BigInt(options.minRevocationSequence ?? 0),
            popProof: options.popProof ?? "",
            popMethod: options.popMethod ?? "",
            popUri: options.popUri ?? "",
            ...(context !== undefined ? { context } : {}),
          },
          call,
        ),
      options,
    );
  }

  /** As an agent: asks the delegating user to approve one high-risk action (same action,
   * resource and context as the Check that answered STEP_UP_REQUIRED). */
  async stepUp(action: string, resource = "", options: StepUpOptions = {}): Promise<StepUp> {
    const context = options.context === undefined ? undefined : toContext(options.context);
    const response = await this.#unary(
      (call) =>
        this.#service.stepUp(
          {
            action,
            resource,
            bindingMessage: options.bindingMessage ?? "",
            ...(context !== undefined ? { context } : {}),
          },
          call,
        ),
      options,
    );
    return required(response.stepUp, "StepUpResponse.step_up");
  }

  /** As the delegating user, with a fresh IdP login: approves or denies a step-up. */
  async resolveStepUp(
    stepUpId: string,
    approve: boolean,
    options: CallOptions & { comment?: string } = {},
  ): Promise<StepUp> {
    const response = await this.#unary(
      (call) => this.#service.resolveStepUp({ stepUpId, approve, comment: options.comment ?? "" }, call),
      options,
    );
    return required(response.stepUp, "ResolveStepUpResponse.step_up");
  }

  /** The caller's step-ups (a user's inbox, an agent's own, or one by id): current state, then
   * every change, until `signal` aborts (or at once with `currentOnly`). */
  async *watchStepUps(
    stepUpId = "",
    options: CallOptions & { currentOnly?: boolean } = {},
  ): AsyncGenerator<StepUp> {
    const request = { stepUpId, currentOnly: options.currentOnly ?? false };
    for await (const response of this.#stream((call) => this.#service.watchStepUps(request, call), options)) {
      if (response.stepUp !== undefined) yield response.stepUp;
    }
  }

  /** Revokes a session and its descendants, every live session of a user, or of an agent. */
  async revoke(
    target: RevokeTarget,
    options: CallOptions & { reason?: string } = {},
  ): Promise<RevokeResponse> {
    const named = Object.entries(target).filter(([, value]) => Boolean(value));
    if (named.length !== 1) throw new TypeError("revoke names exactly one of sessionId, userId, agentId");
    const [[key, value]] = named as [[string, string]];
    const oneof = { case: key as "sessionId" | "userId" | "agentId", value };
    return this.#unary(
      (call) => this.#service.revoke({ target: oneof, reason: options.reason ?? "" }, call),
      options,
    );
  }

  /** The revocation stream (a service with role check or watch): a snapshot first when
   * `afterSequence` is 0 (or its history is gone), then every event after it. RevocationWatcher
   * keeps a local set with it. */
  async *watchRevocations(
    afterSequence: bigint | number = 0n,
    options: CallOptions = {},
  ): AsyncGenerator<WatchRevocationsResponse> {
    const request = { afterSequence: BigInt(afterSequence) };
    yield* this.#stream((call) => this.#service.watchRevocations(request, call), options);
  }

  /** Audit records matching `request` (by session, by user, filters, cursor, follow). */
  async *audit(
    request: MessageInitShape<typeof AuditRequestSchema>,
    options: CallOptions = {},
  ): AsyncGenerator<AuditRecord> {
    for await (const response of this.#stream((call) => this.#service.audit(request, call), options)) {
      if (response.record !== undefined) yield response.record;
    }
  }

  /** Recomputes the audit hash chain over [fromId, toId] (0: from the first / to the last). */
  async verifyAudit(
    options: CallOptions & {
      fromId?: bigint | number;
      toId?: bigint | number;
      checkpoints?: string[];
      checkpointNow?: boolean;
    } = {},
  ): Promise<VerifyAuditResponse> {
    const request = {
      fromId: BigInt(options.fromId ?? 0),
      toId: BigInt(options.toId ?? 0),
      checkpoints: options.checkpoints ?? [],
      checkpointNow: options.checkpointNow ?? false,
    };
    return this.#unary((call) => this.#service.verifyAudit(request, call), options);
  }

  /** The JWK Set that verifies agent tokens, parsed (jose's JSONWebKeySet). */
  async getJwks(options: CallOptions = {}): Promise<JSONWebKeySet> {
    const response = await this.#unary((call) => this.#service.getJwks({}, call), options);
    return parseJwks(response.jwksJson);
  }

  /** Sessions the caller may see, newest first, page after page; live ones unless includeEnded. */
  async *listSessions(
    options: CallOptions & {
      userId?: string;
      agentId?: string;
      includeEnded?: boolean;
      pageSize?: number;
    } = {},
  ): AsyncGenerator<Session> {
    let pageToken = "";
    do {
      const request = {
        userId: options.userId ?? "",
        agentId: options.agentId ?? "",
        includeEnded: options.includeEnded ?? false,
        pageSize: options.pageSize ?? 0,
        pageToken,
      };
      const response = await this.#unary((call) => this.#service.listSessions(request, call), options);
      yield* response.sessions;
      pageToken = response.nextPageToken;
    } while (pageToken);
  }

  /** Registers a new agent (role admin). */
  async createAgent(agentId: string, maxScopes: string[], options: CreateAgentOptions = {}): Promise<Agent> {
    const agent: MessageInitShape<typeof AgentSchema> = {
      id: agentId,
      maxScopes,
      displayName: options.displayName ?? "",
      description: options.description ?? "",
      owners: options.owners ?? [],
      jwksJson: options.jwksJson ?? "",
      ...(options.maxTtlSeconds !== undefined ? { maxTtl: seconds(options.maxTtlSeconds) } : {}),
    };
    const response = await this.#unary((call) => this.#service.createAgent({ agent }, call), options);
    return required(response.agent, "CreateAgentResponse.agent");
  }

  /** One agent (role admin or audit, or one of its owners). */
  async getAgent(agentId: string, options: CallOptions = {}): Promise<Agent> {
    const response = await this.#unary((call) => this.#service.getAgent({ id: agentId }, call), options);
    return required(response.agent, "GetAgentResponse.agent");
  }

  /** The registered agents, page after page; disabled ones only with includeDisabled. */
  async *listAgents(
    options: CallOptions & { includeDisabled?: boolean; pageSize?: number } = {},
  ): AsyncGenerator<Agent> {
    let pageToken = "";
    do {
      const request = {
        includeDisabled: options.includeDisabled ?? false,
        pageSize: options.pageSize ?? 0,
        pageToken,
      };
      const response = await this.#unary((call) => this.#service.listAgents(request, call), options);
      yield* response.agents;
      pageToken = response.nextPageToken;
    } while (pageToken);
  }

  /** Changes the fields of `agent` (found by its id) named in `updateMask` (proto field names:
   * "display_name", "max_scopes", ...), and only those. A config-defined agent is refused. */
  async updateAgent(
    agent: MessageInitShape<typeof AgentSchema>,
    updateMask: string[],
    options: CallOptions = {},
  ): Promise<Agent> {
    const mask: FieldMask = create(FieldMaskSchema, { paths: updateMask });
    const response = await this.#unary(
      (call) => this.#service.updateAgent({ agent, updateMask: mask }, call),
      options,
    );
    return required(response.agent, "UpdateAgentResponse.agent");
  }

  /** The kill switch: the agent can no longer be delegated to, and every live session of it is
   * revoked before the answer, which names them. */
  async disableAgent(
    agentId: string,
    options: CallOptions & { reason?: string } = {},
  ): Promise<DisableAgentResponse> {
    return this.#unary(
      (call) => this.#service.disableAgent({ id: agentId, reason: options.reason ?? "" }, call),
      options,
    );
  }

  /** A disabled agent may be delegated to again (its revoked sessions stay revoked). */
  async enableAgent(agentId: string, options: CallOptions = {}): Promise<Agent> {
    const response = await this.#unary((call) => this.#service.enableAgent({ id: agentId }, call), options);
    return required(response.agent, "EnableAgentResponse.agent");
  }

  /** Withdraws a compromised signing key (role admin). */
  async retireSigningKey(
    kid: string,
    options: CallOptions & { reason?: string } = {},
  ): Promise<RetireSigningKeyResponse> {
    return this.#unary(
      (call) => this.#service.retireSigningKey({ kid, reason: options.reason ?? "" }, call),
      options,
    );
  }

  async #unary<T>(call: (options: ConnectCallOptions) => Promise<T>, options: CallOptions): Promise<T> {
    try {
      return await call(this.#callOptions(options));
    } catch (error) {
      throw AgentIdError.from(error);
    }
  }

  async *#stream<T>(
    call: (options: ConnectCallOptions) => AsyncIterable<T>,
    options: CallOptions,
  ): AsyncGenerator<T> {
    try {
      yield* call(this.#callOptions(options));
    } catch (error) {
      throw AgentIdError.from(error);
    }
  }

  #callOptions(options: CallOptions): ConnectCallOptions {
    const signals = [this.#abort.signal, ...(options.signal ? [options.signal] : [])];
    return {
      signal: signals.length === 1 ? signals[0] : AbortSignal.any(signals),
      ...(options.timeoutMs !== undefined ? { timeoutMs: options.timeoutMs } : {}),
    };
  }
}

/** Adds a DPoP proof (RFC 9449) of `key` to every call: htm POST, htu the method's URL (agentid
 * checks its path; a gRPC target's resolver scheme is no part of it), ath the token's hash. */
function dpop(key: KeyObject, credential: string, target: string): Interceptor {
  const signer = new ProofSigner(key);
  const origin = baseUrl(target, true);
  return (next) => async (request) => {
    const url = `${origin}/${request.service.typeName}/${request.method.name}`;
    request.header.set("dpop", await signer.proof({ method: "POST", url, accessToken: credential }));
    return next(request);
  };
}

function seconds(value: number): Duration {
  if (!Number.isFinite(value) || value < 0) throw new RangeError(`a duration in seconds, not ${value}`);
  const whole = Math.floor(value);
  return create(DurationSchema, { seconds: BigInt(whole), nanos: Math.round((value - whole) * 1e9) });
}

function required<T>(value: T | undefined, field: string): T {
  if (value === undefined) throw new AgentIdError(Code.Internal, "", `the server's answer has no ${field}`);
  return value;
}
