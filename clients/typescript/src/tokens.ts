/**
 * Agent tokens for services that verify them themselves: the claims, verified against agentid's
 * JWKS (cached; fetched again when a token names a key it does not hold), and, with a
 * RevocationWatcher, a local "is this token good" without a Check. RFC 7638 thumbprints for jkt.
 */

import {
  calculateJwkThumbprint,
  createLocalJWKSet,
  createRemoteJWKSet,
  errors,
  type JSONWebKeySet,
  type JWK,
  type JWTPayload,
  type JWTVerifyGetKey,
  jwtVerify,
} from "jose";
import type { Client } from "./client.js";
import type { RevocationWatcher } from "./watcher.js";

/** The actor chain: this agent, and for a sub-agent its parent's `act` inside. */
export interface Actor {
  sub: string;
  sid: string;
  act?: Actor;
}

/** An agent token's claims (docs/api.md "Agent tokens"). */
export interface AgentClaims {
  iss: string;
  /** The delegating user. */
  sub: string;
  act: Actor;
  /** The audiences it may be presented to; absent: any. */
  aud?: string[];
  scopes: string[];
  /** The session id. */
  jti: string;
  /** The session serial: its bit in the revocation set. */
  sn: number;
  iat: number;
  nbf: number;
  exp: number;
  task?: string;
  parent?: string;
  cnf?: { jkt: string };
  /** Every claim as the token carries it. */
  payload: JWTPayload;
}

/** Why a token was refused: the names agentid's Check uses (Reason without REASON_). */
export type TokenProblem =
  | "TOKEN_MALFORMED"
  | "SIGNATURE_INVALID"
  | "TOKEN_EXPIRED"
  | "TOKEN_NOT_YET_VALID"
  | "AUDIENCE_MISMATCH"
  | "SESSION_REVOKED";

/** A token that is not good: `reason` says why. */
export class TokenRejected extends Error {
  constructor(
    readonly reason: TokenProblem,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(`${reason}: ${message}`, options);
    this.name = "TokenRejected";
  }
}

export interface VerifierOptions {
  /** agentid's `tokens.issuer`: the tokens' `iss`. */
  issuer: string;
  /** Where the keys come from: a Client (GetJwks), or the HTTP door's jwks_uri. */
  keys: Client | URL;
  /** This service's audience: a token with `aud` must list it. A token with `aud` is refused
   * when no audience is given here (it was meant for particular services). */
  audience?: string;
  /** With a watcher, a revoked session's token is refused (SESSION_REVOKED), and
   * WatcherNotReady / WatcherStopped are thrown through: refuse the token then. */
  watcher?: RevocationWatcher;
  /** Leeway on nbf (agentid's tokens.nbf_leeway, default 5 s); exp gets none, as in agentid. */
  nbfLeewaySeconds?: number;
  /** The shortest time between two key fetches for unknown kids (default 30 s). */
  refetchCooldownMs?: number;
  /** How long keys from a Client are used before the next token fetches them again (default
   * 5 min): a key agentid retired stops verifying here within it. */
  keyMaxAgeMs?: number;
  /** The clock (tests). */
  now?: () => Date;
}

const ALGORITHMS = ["EdDSA", "ES256"];
/** The header types agentid issues (`tokens.typ`): api.md's agent+jwt, or RFC 9068's at+jwt. */
const TOKEN_TYPES = ["agent+jwt", "at+jwt"];

/** Verifies agent tokens locally: signature (JWKS), typ, issuer, times, audience, revocation. */
export class AgentTokenVerifier {
  readonly #options: VerifierOptions;
  readonly #keys: JWTVerifyGetKey;

  constructor(options: VerifierOptions) {
    if (!options.issuer) throw new TypeError("issuer is required");
    this.#options = options;
    this.#keys =
      options.keys instanceof URL
        ? createRemoteJWKSet(options.keys)
        : cachedKeySet(options.keys, options.refetchCooldownMs ?? 30_000, options.keyMaxAgeMs ?? 300_000);
  }

  /** The token's claims if it is good; TokenRejected (with its reason) if not. */
  async verify(token: string): Promise<AgentClaims> {
    const now = this.#options.now?.() ?? new Date();
    let payload: JWTPayload;
    try {
      let protectedHeader: { typ?: string };
      ({ payload, protectedHeader } = await jwtVerify(token, this.#keys, {
        issuer: this.#options.issuer,
        algorithms: ALGORITHMS,
        requiredClaims: ["exp", "sub", "jti", "act"],
        clockTolerance: this.#options.nbfLeewaySeconds ?? 5,
        currentDate: now,
      }));
      if (!TOKEN_TYPES.includes(protectedHeader.typ ?? "")) {
        throw new TokenRejected("TOKEN_MALFORMED", "not an agent token (typ)");
      }
    } catch (error) {
      if (error instanceof TokenRejected) throw error;
      throw rejection(error);
    }
    if (Math.floor(now.getTime() / 1000) >= (payload.exp ?? 0)) {
      throw new TokenRejected("TOKEN_EXPIRED", "the token has expired");
    }
    const claims = toClaims(payload);
    if (claims.aud !== undefined) {
      const audience = this.#options.audience;
      if (audience === undefined || !claims.aud.includes(audience)) {
        throw new TokenRejected("AUDIENCE_MISMATCH", `the token is for ${claims.aud.join(", ")}`);
      }
    }
    if (this.#options.watcher?.isRevoked(claims.sn)) {
      throw new TokenRejected("SESSION_REVOKED", `session ${claims.jti} is revoked`);
    }
    return claims;
  }
}

/** A JWK Set from its JSON (GetJwks' jwks_json): `{keys: [...]}`, public keys only. */
export function parseJwks(json: string): JSONWebKeySet {
  const parsed: unknown = JSON.parse(json);
  if (typeof parsed !== "object" || parsed === null || !Array.isArray((parsed as { keys?: unknown }).keys)) {
    throw new TypeError("not a JWK Set: no keys array");
  }
  const keys = (parsed as { keys: unknown[] }).keys;
  for (const key of keys) {
    if (typeof key !== "object" || key === null || "d" in key)
      throw new TypeError("a JWK Set of public keys was expected");
  }
  return parsed as JSONWebKeySet;
}

/** The RFC 7638 thumbprint (SHA-256, base64url) of a public JWK: Delegate's `jkt`. */
export function jwkThumbprint(jwk: JWK): Promise<string> {
  return calculateJwkThumbprint(jwk, "sha256");
}

/** A key set from GetJwks, kept until a token names a kid it lacks (then fetched again, at most
 * once per cooldown: a flood of made-up kids does not become a flood of fetches) or it is
 * `maxAgeMs` old (a failed fetch then keeps the keys held until the next one works). */
function cachedKeySet(client: Client, cooldownMs: number, maxAgeMs: number): JWTVerifyGetKey {
  let current: { keys: ReturnType<typeof createLocalJWKSet>; fetched: number } | undefined;
  let pending: Promise<void> | undefined;
  const refresh = () => {
    pending ??= client
      .getJwks()
      .then((jwks) => {
        current = { keys: createLocalJWKSet(jwks), fetched: Date.now() };
      })
      .finally(() => {
        pending = undefined;
      });
    return pending;
  };
  return async (header, token) => {
    if (current === undefined) await refresh();
    else if (Date.now() - current.fetched >= maxAgeMs) {
      await refresh().catch(() => {
        current!.fetched = Date.now() - maxAgeMs + cooldownMs; // try again after the cooldown
      });
    }
    try {
      return await current!.keys(header, token);
    } catch (error) {
      if (!(error instanceof errors.JWKSNoMatchingKey) || Date.now() - current!.fetched < cooldownMs)
        throw error;
      await refresh();
      return current!.keys(header, token);
    }
  };
}

function rejection(error: unknown): unknown {
  if (error instanceof errors.JWTExpired)
    return new TokenRejected("TOKEN_EXPIRED", "the token has expired", { cause: error });
  if (error instanceof errors.JWTClaimValidationFailed) {
    if (error.claim === "nbf")
      return new TokenRejected("TOKEN_NOT_YET_VALID", "the token is not valid yet", { cause: error });
    if (error.claim === "iss")
      return new TokenRejected("TOKEN_MALFORMED", "issued by someone else", { cause: error });
    return new TokenRejected("TOKEN_MALFORMED", error.message, { cause: error });
  }
  if (
    error instanceof errors.JWSSignatureVerificationFailed ||
    error instanceof errors.JWKSNoMatchingKey ||
    error instanceof errors.JWKSMultipleMatchingKeys ||
    error instanceof errors.JOSEAlgNotAllowed
  ) {
    return new TokenRejected("SIGNATURE_INVALID", error.message, { cause: error });
  }
  if (error instanceof errors.JOSEError)
    return new TokenRejected("TOKEN_MALFORMED", error.message, { cause: error });
  return error; // the key fetch failed (an AgentIdError, a network error): not the token's fault
}

function toClaims(payload: JWTPayload): AgentClaims {
  const malformed = (what: string) => new TokenRejected("TOKEN_MALFORMED", what);
  const act = payload["act"] as Actor | undefined;
  if (typeof act?.sub !== "string" || typeof act.sid !== "string") throw malformed("no act claim");
  const sn = payload["sn"];
  if (typeof sn !== "number" || !Number.isInteger(sn) || sn < 0) throw malformed("no sn claim");
  const scope = payload["scope"];
  if (typeof scope !== "string") throw malformed("no scope claim");
  const aud =
    payload.aud === undefined ? undefined : Array.isArray(payload.aud) ? payload.aud : [payload.aud];
  const claims: AgentClaims = {
    iss: payload.iss ?? "",
    sub: payload.sub ?? "",
    act,
    scopes: scope.split(" ").filter(Boolean),
    jti: payload.jti ?? "",
    sn,
    iat: payload.iat ?? 0,
    nbf: payload.nbf ?? payload.iat ?? 0,
    exp: payload.exp ?? 0,
    payload,
  };
  if (aud !== undefined) claims.aud = aud;
  if (typeof payload["task"] === "string") claims.task = payload["task"];
  if (typeof payload["parent"] === "string") claims.parent = payload["parent"];
  const cnf = payload["cnf"] as { jkt?: unknown } | undefined;
  if (typeof cnf?.jkt === "string") claims.cnf = { jkt: cnf.jkt };
  return claims;
}
