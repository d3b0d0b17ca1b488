/**
 * The MCP server guard: an MCP server (the official TypeScript SDK, streamable HTTP) as an OAuth
 * resource server of agentid. Agent tokens are verified locally on every HTTP request (the SDK's
 * bearer-auth middleware with this guard as its token verifier), the RFC 9728 metadata names
 * agentid, and every tools/call is a Check: DENY is the MCP spec's 403 insufficient_scope,
 * STEP_UP_REQUIRED a StepUp and a URL elicitation (or a tool error) sending the user to the
 * console. The agent's token goes to agentid's Check and StepUp, and nowhere else.
 */

import type { IncomingMessage, ServerResponse } from "node:http";
import { metadataHandler } from "@modelcontextprotocol/sdk/server/auth/handlers/metadata.js";
import { InvalidTokenError, ServerError } from "@modelcontextprotocol/sdk/server/auth/errors.js";
import { requireBearerAuth } from "@modelcontextprotocol/sdk/server/auth/middleware/bearerAuth.js";
import type { OAuthTokenVerifier } from "@modelcontextprotocol/sdk/server/auth/provider.js";
import { getOAuthProtectedResourceMetadataUrl } from "@modelcontextprotocol/sdk/server/auth/router.js";
import type { AuthInfo } from "@modelcontextprotocol/sdk/server/auth/types.js";
import type { Server } from "@modelcontextprotocol/sdk/server/index.js";
import type { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import type { OAuthProtectedResourceMetadata } from "@modelcontextprotocol/sdk/shared/auth.js";
import type { Transport } from "@modelcontextprotocol/sdk/shared/transport.js";
import {
  ErrorCode,
  isJSONRPCRequest,
  type JSONRPCMessage,
  type RequestId,
  UrlElicitationRequiredError,
} from "@modelcontextprotocol/sdk/types.js";
import type { Client } from "../client.js";
import { PROOF_ALGORITHMS, ProofRejected, ProofVerifier, proofUri } from "../dpop.js";
import { AgentIdError, Code } from "../errors.js";
import { type CheckResponse, Decision, Reason, type StepUp } from "../gen/agentid/v1/agentid_pb.js";
import { type AgentClaims, AgentTokenVerifier, TokenRejected } from "../tokens.js";
import type { RevocationWatcher } from "../watcher.js";
import { CompiledTool, type ToolCheck, ToolCallRefused, type ToolDeclaration } from "./tools.js";

export interface McpGuardOptions {
  /** The MCP server's canonical resource URL (RFC 8707), e.g. `https://tools.example/mcp`:
   * the `aud` its tokens must carry, and its checker service's `audience` in agentid. */
  resourceUrl: string;
  /** The server's name in default actions: `mcp.<serverName>.<tool>` (an action segment). */
  serverName: string;
  /** agentid's `tokens.issuer`: the tokens' `iss`, and the authorization server the metadata
   * names. */
  issuer: string;
  /** agentid's `http.public_url` (default the issuer): where the console sends the user. */
  publicUrl?: string;
  /** Where the keys come from: agentid's `jwks_uri`, or a Client (GetJwks). */
  keys: Client | URL;
  /** A client whose credential is a `[[services]]` entry with role `check` and `audience` =
   * resourceUrl: it makes the Checks, and (with the agent's own token) the StepUps. */
  client: Client;
  /** With a watcher, a revoked session's token is refused at once, before any Check. */
  watcher?: RevocationWatcher;
  /** Per-tool declarations by tool name; a tool not named is checked with the default action. */
  tools?: Readonly<Record<string, ToolDeclaration>>;
  /** DPoP-bound tokens (RFC 9449) and their proofs' replay bounds; `false`: refuse them. */
  dpop?: false | { maxAgeSeconds?: number; maxProofs?: number; maxProofsPerUser?: number };
  /** The deadline of each Check and StepUp in ms (default 5000). */
  timeoutMs?: number;
  /** The clock (tests). */
  now?: () => Date;
}

/** An HTTP request as the guard reads it (Node's, with what Express and the SDK add). */
export interface GuardRequest extends IncomingMessage {
  auth?: AuthInfo;
  body?: unknown;
  originalUrl?: string;
}

/** A connect/Express-style middleware. */
export type GuardMiddleware = (
  req: GuardRequest,
  res: ServerResponse,
  next: (error?: unknown) => void,
) => void;

/** What the guard knows of a verified token, in `authInfo.extra` for tool handlers (never the
 * token itself there: it stays in `authInfo.token`, which a tool must not forward). */
export interface AgentAuth {
  userId: string;
  agentId: string;
  sessionId: string;
  claims: AgentClaims;
}

/** How one tools/call of a request was decided before it reached the MCP server. */
type Outcome =
  | { kind: "allow"; id: RequestId; decision: CheckResponse }
  | { kind: "step-up"; id: RequestId; stepUp: StepUp; url: string; text: string }
  | { kind: "tool-error"; id: RequestId; text: string }
  | { kind: "refused"; id: RequestId; message: string };

const TOKEN_PROBLEMS = new Set([
  Reason.TOKEN_MALFORMED,
  Reason.SIGNATURE_INVALID,
  Reason.TOKEN_EXPIRED,
  Reason.TOKEN_NOT_YET_VALID,
  Reason.AUDIENCE_MISMATCH,
  Reason.SESSION_REVOKED,
  Reason.PROOF_OF_POSSESSION_FAILED,
]);

/**
 * Protects an MCP server served over streamable HTTP (see docs/mcp.md, "TypeScript"):
 * `metadataPath` + `metadata()` serve RFC 9728 metadata, `middleware()` goes before the
 * transport's handleRequest (after express.json()), and `connect(server, transport)` replaces
 * `server.connect(transport)`.
 */
export class McpGuard implements OAuthTokenVerifier {
  readonly resourceUrl: string;
  readonly serverName: string;
  /** The URL of the protected-resource metadata (in 401 and 403 challenges). */
  readonly metadataUrl: string;
  /** The path to serve `metadata()` at: `/.well-known/oauth-protected-resource<resource path>`. */
  readonly metadataPath: string;
  readonly #options: McpGuardOptions;
  readonly #verifier: AgentTokenVerifier;
  readonly #proofs: ProofVerifier | undefined;
  readonly #tools = new Map<string, CompiledTool>();
  readonly #undeclared = new CompiledTool("", {});
  readonly #consoleUrl: string;
  /** Per verified request: the token and its claims, then how its tools/call was decided. */
  readonly #tokens = new WeakMap<AuthInfo, { token: string; claims: AgentClaims }>();
  readonly #outcomes = new WeakMap<AuthInfo, Outcome>();

  constructor(options: McpGuardOptions) {
    const resource = new URL(options.resourceUrl);
    if (resource.hash) throw new TypeError("resourceUrl must not have a fragment (RFC 8707)");
    if (!/^[a-z0-9_-]+$/.test(options.serverName)) {
      throw new TypeError("serverName must be one action segment ([a-z0-9_-]+)");
    }
    this.resourceUrl = options.resourceUrl;
    this.serverName = options.serverName;
    this.metadataUrl = getOAuthProtectedResourceMetadataUrl(resource);
    this.metadataPath = new URL(this.metadataUrl).pathname;
    this.#options = options;
    this.#verifier = new AgentTokenVerifier({
      issuer: options.issuer,
      keys: options.keys,
      audience: options.resourceUrl,
      ...(options.watcher !== undefined ? { watcher: options.watcher } : {}),
      ...(options.now !== undefined ? { now: options.now } : {}),
    });
    if (options.dpop !== false) {
      this.#proofs = new ProofVerifier({
        ...options.dpop,
        ...(options.now !== undefined ? { now: options.now } : {}),
      });
    }
    for (const [name, declaration] of Object.entries(options.tools ?? {})) {
      this.#tools.set(name, new CompiledTool(name, declaration));
    }
    const base = (options.publicUrl ?? options.issuer).replace(/\/+$/, "");
    this.#consoleUrl = `${base}/console/step-ups`;
  }

  /** The RFC 9728 metadata document this server publishes. */
  get protectedResourceMetadata(): OAuthProtectedResourceMetadata {
    return {
      resource: this.resourceUrl,
      authorization_servers: [this.#options.issuer],
      bearer_methods_supported: ["header"],
      resource_name: this.serverName,
      ...(this.#proofs !== undefined ? { dpop_signing_alg_values_supported: [...PROOF_ALGORITHMS] } : {}),
    };
  }

  /** The SDK's metadata handler for that document: `app.use(guard.metadataPath, guard.metadata())`. */
  metadata(): GuardMiddleware {
    return metadataHandler(this.protectedResourceMetadata) as GuardMiddleware;
  }

  /** OAuthTokenVerifier: the token verified locally (signature, iss, `aud` naming this server,
   * times, the watcher's revoked set); the SDK's InvalidTokenError (401) when it is not good. */
  async verifyAccessToken(token: string): Promise<AuthInfo> {
    let claims: AgentClaims;
    try {
      claims = await this.#verifier.verify(token);
    } catch (error) {
      if (error instanceof TokenRejected) throw new InvalidTokenError(error.message);
      throw new ServerError("the token cannot be verified now"); // keys or revocations unknown
    }
    if (!claims.aud?.includes(this.resourceUrl)) {
      throw new InvalidTokenError("AUDIENCE_MISMATCH: the token is not for this MCP server (aud)");
    }
    const extra: AgentAuth = { userId: claims.sub, agentId: claims.act.sub, sessionId: claims.jti, claims };
    const info: AuthInfo = {
      token,
      clientId: claims.act.sub,
      scopes: claims.scopes,
      expiresAt: claims.exp,
      resource: new URL(this.resourceUrl),
      extra: { agentid: extra },
    };
    this.#tokens.set(info, { token, claims });
    return info;
  }

  /**
   * The middleware for the MCP endpoint (every method: POST, GET, DELETE), after a JSON body
   * parser: the SDK's requireBearerAuth with this guard as verifier (`Authorization: Bearer`,
   * or `DPoP` with a `DPoP` proof for a key-bound token), then the Check of a tools/call.
   */
  middleware(): GuardMiddleware {
    const bearer = requireBearerAuth({
      verifier: this,
      resourceMetadataUrl: this.metadataUrl,
      expectedResource: new URL(this.resourceUrl),
    }) as GuardMiddleware;
    return (req, res, next) => {
      // The SDK's middleware reads the Bearer scheme; a DPoP one carries the token the same way.
      const authorization = req.headers.authorization;
      const dpop = authorization !== undefined && /^DPoP\s/i.test(authorization);
      if (dpop) req.headers.authorization = `Bearer ${authorization.slice(5).trim()}`;
      void bearer(req, res, (error) => {
        if (error !== undefined) return next(error);
        this.#afterAuthentication(req, res, dpop).then(
          (proceed) => proceed && next(),
          (failure: unknown) => next(failure),
        );
      });
    };
  }

  /**
   * Connects `server` (an McpServer or the SDK's Server) to `transport`, as server.connect
   * does, and answers every tools/call that the middleware did not allow: a step-up (URL
   * elicitation when the client declared it, else a tool error), a refused call, or a call
   * that never went through the middleware (refused).
   */
  async connect(server: McpServer | Server, transport: Transport): Promise<void> {
    // Duck-typed: an app with its own copy of the SDK passes a McpServer of that copy.
    const low: Server = "getClientCapabilities" in server ? server : server.server;
    await low.connect(transport);
    const deliver = transport.onmessage;
    transport.onmessage = (message, extra) => {
      if (!isJSONRPCRequest(message) || message.method !== "tools/call") {
        return deliver?.(message, extra);
      }
      const outcome = extra?.authInfo !== undefined ? this.#outcomes.get(extra.authInfo) : undefined;
      if (outcome?.kind === "allow" && outcome.id === message.id) {
        this.#outcomes.delete(extra!.authInfo!);
        return deliver?.(message, extra);
      }
      const urlMode = low.getClientCapabilities()?.elicitation?.url !== undefined;
      const answer = this.#answer(message.id, outcome?.id === message.id ? outcome : undefined, urlMode);
      transport
        .send(answer, { relatedRequestId: message.id })
        .catch((error: unknown) => transport.onerror?.(error as Error));
    };
  }

  async #afterAuthentication(req: GuardRequest, res: ServerResponse, dpop: boolean): Promise<boolean> {
    const auth = req.auth;
    const verified = auth !== undefined ? this.#tokens.get(auth) : undefined;
    if (auth === undefined || verified === undefined) {
      throw new Error("McpGuard: req.auth was not set by this guard's verifier");
    }
    const url = proofUri(new URL(req.originalUrl ?? req.url ?? "/", this.resourceUrl));
    const proof = await this.#verifyProof(req, res, dpop, verified, url);
    if (proof === false) return false;
    const call = toolCall(req, res);
    if (call === undefined || call === false) return call === undefined;
    const tool = typeof call.params?.name === "string" ? call.params.name : "";
    const args = call.params?.arguments ?? {};
    let check: ToolCheck;
    try {
      if (typeof args !== "object" || args === null || Array.isArray(args)) {
        throw new ToolCallRefused("the arguments are not an object");
      }
      const declared = this.#tools.get(tool) ?? this.#undeclared;
      check = declared.check(this.serverName, tool, args as Record<string, unknown>);
    } catch (error) {
      if (!(error instanceof ToolCallRefused)) throw error;
      this.#outcomes.set(auth, { kind: "refused", id: call.id, message: error.message });
      return true;
    }
    return this.#decide(req, res, auth, call.id, tool, check, { token: verified.token, proof, url });
  }

  /** For a key-bound token (or the DPoP scheme): its proof verified and spent, or the 401
   * answered (false). Undefined for a bearer token. */
  async #verifyProof(
    req: GuardRequest,
    res: ServerResponse,
    dpop: boolean,
    { token, claims }: { token: string; claims: AgentClaims },
    url: string,
  ): Promise<string | undefined | false> {
    const jkt = claims.cnf?.jkt;
    if (jkt === undefined && !dpop) return undefined;
    if (this.#proofs === undefined) {
      return this.#challenge(res, 401, "Bearer", "invalid_token", "DPoP-bound tokens are not accepted here");
    }
    if (jkt === undefined) {
      return this.#challenge(
        res,
        401,
        "DPoP",
        "invalid_token",
        "the token is not bound to a key: send it as Bearer",
      );
    }
    if (!dpop) {
      // RFC 9449 section 7.2: a bound token presented as a bearer token is refused.
      return this.#challenge(
        res,
        401,
        "DPoP",
        "invalid_token",
        "a DPoP-bound token goes with the DPoP scheme",
      );
    }
    const header = req.headers["dpop"];
    const proof = typeof header === "string" ? header : undefined; // two DPoP headers: refused
    try {
      const method = req.method ?? "";
      await this.#proofs.verify(proof, { jkt, method, url, accessToken: token, user: claims.sub });
    } catch (error) {
      if (!(error instanceof ProofRejected)) throw error;
      return this.#challenge(res, 401, "DPoP", "invalid_dpop_proof", error.message);
    }
    return proof;
  }

  /** The Check of one tools/call: ALLOW and STEP_UP_REQUIRED become the request's outcome (the
   * transport answers a step-up), a DENY is answered here (401 or 403). */
  async #decide(
    req: GuardRequest,
    res: ServerResponse,
    auth: AuthInfo,
    id: RequestId,
    tool: string,
    check: ToolCheck,
    presented: { token: string; proof: string | undefined; url: string },
  ): Promise<boolean> {
    const pop =
      presented.proof !== undefined
        ? { popProof: presented.proof, popMethod: req.method ?? "POST", popUri: presented.url }
        : {};
    let decision: CheckResponse;
    try {
      decision = await this.#options.client.check(presented.token, check.action, check.resource, {
        ...(check.context !== undefined ? { context: check.context } : {}),
        timeoutMs: this.#options.timeoutMs ?? 5000,
        ...pop,
      });
    } catch (error) {
      return this.#agentidFailed(res, id, error);
    }
    if (decision.decision === Decision.ALLOW) {
      this.#outcomes.set(auth, { kind: "allow", id, decision });
      return true;
    }
    if (decision.decision === Decision.STEP_UP_REQUIRED) {
      const outcome = await this.#stepUp(id, tool, check, presented.token);
      if (outcome instanceof Error) return this.#agentidFailed(res, id, outcome);
      this.#outcomes.set(auth, outcome);
      return true;
    }
    const description = decision.message || `${Reason[decision.reason] ?? "denied"}`;
    if (TOKEN_PROBLEMS.has(decision.reason)) {
      // The token (or its proof) is not good: 401, as the local verification answers it.
      if (presented.proof === undefined)
        return this.#challenge(res, 401, "Bearer", "invalid_token", description);
      const proofFailed = decision.reason === Reason.PROOF_OF_POSSESSION_FAILED;
      return this.#challenge(
        res,
        401,
        "DPoP",
        proofFailed ? "invalid_dpop_proof" : "invalid_token",
        description,
      );
    }
    // The MCP spec's scope challenge: the scope this call needs, and where to learn more.
    return challenge(res, 403, "Bearer", {
      error: "insufficient_scope",
      scope: check.resource ? `${check.action}:${check.resource}` : check.action,
      error_description: description,
      resource_metadata: this.metadataUrl,
    });
  }

  /** agentid's StepUp with the agent's own token, same action, resource and context: the
   * step-up for the user to approve, or an Error when agentid could not make it. */
  async #stepUp(id: RequestId, tool: string, check: ToolCheck, token: string): Promise<Outcome | Error> {
    const agent = this.#options.client.withCredential(token);
    const named = `${tool} on MCP server ${this.serverName}`;
    try {
      const stepUp = await agent.stepUp(check.action, check.resource, {
        ...(check.context !== undefined ? { context: check.context } : {}),
        bindingMessage: check.resource ? `${named} (${check.resource})` : named,
        timeoutMs: this.#options.timeoutMs ?? 5000,
      });
      const url = `${this.#consoleUrl}?step_up=${encodeURIComponent(stepUp.id)}`;
      const text =
        `Your user's approval is needed for ${tool} on ${this.serverName}: agentid step-up ` +
        `${stepUp.id}, to approve at ${url}. Call the tool again once it is approved.`;
      return { kind: "step-up", id, stepUp, url, text };
    } catch (error) {
      if (error instanceof AgentIdError && error.reason === "PROOF_OF_POSSESSION_FAILED") {
        // A key-bound agent's StepUp needs its own proof, which only the agent can make.
        const text =
          `Your user's approval is needed for ${tool} on ${this.serverName}. This token is bound ` +
          `to a key: ask agentid's StepUp yourself (action ${check.action}, resource ` +
          `"${check.resource}", the same arguments as context), then call again once it is approved.`;
        return { kind: "tool-error", id, text };
      }
      return AgentIdError.from(error);
    } finally {
      agent.close();
    }
  }

  /** The answer to a tools/call the middleware did not allow. */
  #answer(id: RequestId, outcome: Outcome | undefined, urlMode: boolean): JSONRPCMessage {
    if (outcome === undefined || outcome.kind === "allow") {
      const message =
        "this tools/call was not checked by agentid: mount guard.middleware() before the transport";
      return { jsonrpc: "2.0", id, error: { code: ErrorCode.InvalidRequest, message } };
    }
    if (outcome.kind === "refused") {
      return { jsonrpc: "2.0", id, error: { code: ErrorCode.InvalidParams, message: outcome.message } };
    }
    if (outcome.kind === "step-up" && urlMode) {
      // The spec's URLElicitationRequiredError (-32042), the step-up id as its elicitationId.
      const { stepUp, url, text } = outcome;
      const message = `step-up ${stepUp.id} needs the user's approval`;
      const elicitation = new UrlElicitationRequiredError(
        [{ mode: "url", elicitationId: stepUp.id, url, message: text }],
        message,
      );
      return { jsonrpc: "2.0", id, error: { code: elicitation.code, message, data: elicitation.data } };
    }
    return { jsonrpc: "2.0", id, result: { content: [{ type: "text", text: outcome.text }], isError: true } };
  }

  #challenge(
    res: ServerResponse,
    status: number,
    scheme: "Bearer" | "DPoP",
    error: string,
    description: string,
  ): false {
    const params: Record<string, string> = { error, error_description: description };
    if (scheme === "DPoP") params["algs"] = PROOF_ALGORITHMS.join(" ");
    params["resource_metadata"] = this.metadataUrl;
    return challenge(res, status, scheme, params);
  }

  /** agentid could not decide (unreachable, a deadline, a refused credential): the call is
   * refused, 503 when it may work again shortly, 500 otherwise; nothing about the token. */
  #agentidFailed(res: ServerResponse, id: RequestId, error: unknown): false {
    const failure = AgentIdError.from(error);
    const retry = failure.code === Code.Unavailable || failure.code === Code.DeadlineExceeded;
    return rpcError(
      res,
      retry ? 503 : 500,
      id,
      ErrorCode.InternalError,
      `agentid could not decide this call (${failure.codeName})`,
    );
  }
}

/** An RFC 6750 / RFC 9449 challenge: the status, WWW-Authenticate with these parameters, and
 * the OAuth error body (`error`, `error_description`). */
function challenge(
  res: ServerResponse,
  status: number,
  scheme: "Bearer" | "DPoP",
  params: Record<string, string>,
): false {
  const header = Object.entries(params)
    .map(([name, value]) => `${name}="${quoted(value)}"`)
    .join(", ");
  res.statusCode = status;
  res.setHeader("WWW-Authenticate", `${scheme} ${header}`);
  res.setHeader("Content-Type", "application/json");
  res.setHeader("Cache-Control", "no-store");
  res.end(JSON.stringify({ error: params["error"], error_description: params["error_description"] }));
  return false;
}

/** The tools/call a POST carries: undefined when none, false when the 400 is answered (a
 * batch of several: one proof cannot be spent by several Checks). */
function toolCall(
  req: GuardRequest,
  res: ServerResponse,
): { id: RequestId; params?: { name?: unknown; arguments?: unknown } } | undefined | false {
  if (req.method !== "POST") return undefined;
  if (req.body === undefined) throw new Error("McpGuard: no parsed body: mount express.json() first");
  const messages: unknown[] = Array.isArray(req.body) ? req.body : [req.body];
  const calls = messages.filter((message) => isJSONRPCRequest(message) && message.method === "tools/call");
  if (calls.length > 1) {
    const message = "one tools/call per HTTP request (each is checked with its own proof)";
    return rpcError(res, 400, null, ErrorCode.InvalidRequest, message);
  }
  return calls[0] as { id: RequestId; params?: { name?: unknown; arguments?: unknown } } | undefined;
}

function rpcError(
  res: ServerResponse,
  status: number,
  id: RequestId | null,
  code: number,
  message: string,
): false {
  res.statusCode = status;
  res.setHeader("Content-Type", "application/json");
  res.end(JSON.stringify({ jsonrpc: "2.0", id, error: { code, message } }));
  return false;
}

/** Text fit for a quoted-string of a challenge (RFC 6750 section 3: no `"` or `\`, printable
 * ASCII). */
function quoted(text: string): string {
  return text.replace(/["\\]/g, "'").replace(/[^\x20-\x7e]/g, "?");
}
