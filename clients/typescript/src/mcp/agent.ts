/**
 * The agent's side: a token for one MCP server by OAuth token exchange at agentid (RFC 8693,
 * `resource` = the server, RFC 8707), optionally bound to a key the agent holds (DPoP, RFC
 * 9449), and a fetch for the SDK's StreamableHTTPClientTransport that presents it on every
 * request (a fresh DPoP proof each, for its method and URL).
 */

import type { KeyObject } from "node:crypto";
import { parseErrorResponse } from "@modelcontextprotocol/sdk/client/auth.js";
import type { Middleware } from "@modelcontextprotocol/sdk/client/middleware.js";
import { OAuthTokensSchema } from "@modelcontextprotocol/sdk/shared/auth.js";
import type { FetchLike } from "@modelcontextprotocol/sdk/shared/transport.js";
import { clientAssertion } from "../assertion.js";
import { ProofSigner } from "../dpop.js";

export const TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange";
export const JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt";
const JWT_BEARER_ASSERTION = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

export interface McpTokenRequest {
  /** agentid's token endpoint: `<public_url>/oauth2/token`. */
  tokenEndpoint: string | URL;
  /** The agent id (the OAuth client). */
  clientId: string;
  /** The delegating user's IdP token, or the parent agent's token for a sub-agent. */
  subjectToken: string;
  /** Its type (default `urn:ietf:params:oauth:token-type:jwt`). */
  subjectTokenType?: string;
  /** The MCP server's resource URL: the token's `aud`, and where `fetch` presents it. */
  resource: string;
  /** The scopes asked for (space-separated or a list); nothing is widened or dropped. */
  scope: string | readonly string[];
  /** An agent with keys: its private key, which signs a fresh client assertion per request. */
  clientKey?: KeyObject;
  /** That key's `kid` in the agent's JWKS. */
  clientKeyId?: string;
  /** The assertion's `aud` (default the token endpoint URL; agentid's issuer works too). */
  assertionAudience?: string;
  /** Bind the token to this key (Ed25519 or P-256): a DPoP-bound token, each request proving it. */
  proofKey?: KeyObject;
  /** The lifetime asked for, in seconds (agentid clamps it). */
  expiresInSeconds?: number;
  task?: string;
  /** The fetch underneath (default the global one). */
  fetch?: FetchLike;
}

/** A token for one MCP server, and the fetch that presents it there. */
export class McpToken {
  readonly accessToken: string;
  /** `DPoP` for a key-bound token, else `Bearer`. */
  readonly tokenType: "Bearer" | "DPoP";
  readonly expiresAt: Date;
  readonly scopes: readonly string[];
  readonly resource: string;
  readonly #signer: ProofSigner | undefined;
  readonly #fetch: FetchLike;

  constructor(
    fields: {
      accessToken: string;
      tokenType: "Bearer" | "DPoP";
      expiresAt: Date;
      scopes: string[];
      resource: string;
    },
    signer: ProofSigner | undefined,
    fetch: FetchLike,
  ) {
    this.accessToken = fields.accessToken;
    this.tokenType = fields.tokenType;
    this.expiresAt = fields.expiresAt;
    this.scopes = Object.freeze([...fields.scopes]);
    this.resource = fields.resource;
    this.#signer = signer;
    this.#fetch = fetch;
  }

  /** The SDK's fetch middleware (`applyMiddlewares`): requests to the MCP server's origin get
   * `Authorization` (and a fresh `DPoP` proof); any other origin gets nothing of the token. */
  middleware(): Middleware {
    const origin = new URL(this.resource).origin;
    return (next) => async (input, init) => {
      const url = new URL(input);
      if (url.origin !== origin) return next(input, init);
      const headers = new Headers(init?.headers);
      headers.set("Authorization", `${this.tokenType} ${this.accessToken}`);
      if (this.#signer !== undefined) {
        const method = init?.method ?? "GET";
        headers.set("DPoP", await this.#signer.proof({ method, url, accessToken: this.accessToken }));
      }
      return next(input, { ...init, headers });
    };
  }

  /** A fetch for `new StreamableHTTPClientTransport(url, { fetch: token.fetch })`. */
  get fetch(): FetchLike {
    return this.middleware()(this.#fetch);
  }
}

/** Exchanges the subject token at agentid for a token for one MCP server. A refusal is the
 * SDK's OAuthError of the answer's `error` (InvalidScopeError, InvalidGrantError,
 * InvalidClientError, ...), with agentid's description. */
export async function requestMcpToken(request: McpTokenRequest): Promise<McpToken> {
  const fetch = request.fetch ?? globalThis.fetch;
  const endpoint = new URL(request.tokenEndpoint);
  const scope = typeof request.scope === "string" ? request.scope : request.scope.join(" ");
  const form = new URLSearchParams({
    grant_type: TOKEN_EXCHANGE_GRANT,
    client_id: request.clientId,
    subject_token: request.subjectToken,
    subject_token_type: request.subjectTokenType ?? JWT_TOKEN_TYPE,
    resource: request.resource,
    scope,
  });
  if (request.expiresInSeconds !== undefined) form.set("expires_in", String(request.expiresInSeconds));
  if (request.task !== undefined) form.set("task", request.task);
  if (request.clientKey !== undefined) {
    const assertion = await clientAssertion(request.clientId, request.clientKey, {
      audience: request.assertionAudience ?? endpoint.href,
      ...(request.clientKeyId !== undefined ? { kid: request.clientKeyId } : {}),
    });
    form.set("client_assertion_type", JWT_BEARER_ASSERTION);
    form.set("client_assertion", assertion);
  }
  const headers = new Headers({
    "Content-Type": "application/x-www-form-urlencoded",
    Accept: "application/json",
  });
  const signer = request.proofKey !== undefined ? new ProofSigner(request.proofKey) : undefined;
  if (signer !== undefined) headers.set("DPoP", await signer.proof({ method: "POST", url: endpoint }));
  const response = await fetch(endpoint, { method: "POST", headers, body: form, redirect: "error" });
  if (!response.ok) throw await parseErrorResponse(response);
  const tokens = OAuthTokensSchema.parse(await response.json());
  const tokenType = tokens.token_type.toLowerCase() === "dpop" ? "DPoP" : "Bearer";
  if ((tokenType === "DPoP") !== (signer !== undefined)) {
    throw new Error(
      `agentid answered a ${tokens.token_type} token to a ${signer ? "DPoP" : "Bearer"} request`,
    );
  }
  const lifetime = tokens.expires_in ?? 0;
  return new McpToken(
    {
      accessToken: tokens.access_token,
      tokenType,
      expiresAt: new Date(Date.now() + lifetime * 1000),
      scopes: (tokens.scope ?? scope).split(" ").filter(Boolean),
      resource: request.resource,
    },
    signer,
    fetch,
  );
}
