/**
 * DPoP (RFC 9449): proofs an agent makes with the key its token is bound to, and, for a service
 * that verifies bound tokens itself, their verification with a bounded replay cache.
 */

import { createHash, type KeyObject, randomUUID } from "node:crypto";
import { calculateJwkThumbprint, EmbeddedJWK, errors, exportJWK, type JWK, jwtVerify, SignJWT } from "jose";

/** The proof algorithms agentid accepts from a key-bound agent (its own verifier's, in agentid_client.dpop). */
export const PROOF_ALGORITHMS = ["EdDSA", "ES256", "RS256", "PS256"] as const;

/** What a proof is for: the HTTP method and URL (its query and fragment are dropped), and the
 * access token it accompanies (none at a token endpoint, where it asks for a bound token). */
export interface ProofTarget {
  method: string;
  url: string | URL;
  accessToken?: string;
}

/** Makes DPoP proofs of one private key (Ed25519 or P-256), a fresh `jti` each. */
export class ProofSigner {
  readonly #key: KeyObject;
  readonly #alg: "EdDSA" | "ES256";
  #jwk: Promise<JWK> | undefined;

  constructor(key: KeyObject) {
    this.#alg = proofAlgorithm(key);
    this.#key = key;
  }

  /** The public key as a JWK (kty, crv, x[, y]): what the proof header carries. */
  publicJwk(): Promise<JWK> {
    this.#jwk ??= exportJWK(this.#key).then(
      ({ kty, crv, x, y }) => ({ kty, crv, x, ...(y !== undefined ? { y } : {}) }) as JWK,
    );
    return this.#jwk;
  }

  /** The RFC 7638 thumbprint of the key: the `jkt` a token bound to it carries. */
  async thumbprint(): Promise<string> {
    return calculateJwkThumbprint(await this.publicJwk(), "sha256");
  }

  async proof(target: ProofTarget): Promise<string> {
    return new SignJWT({
      htm: target.method.toUpperCase(),
      htu: proofUri(target.url),
      ...(target.accessToken !== undefined ? { ath: tokenHash(target.accessToken) } : {}),
    })
      .setProtectedHeader({ typ: "dpop+jwt", alg: this.#alg, jwk: await this.publicJwk() })
      .setJti(randomUUID())
      .setIssuedAt()
      .sign(this.#key);
  }
}

/** The proof algorithm of an agent's private key; TypeError for any other key. */
export function proofAlgorithm(key: KeyObject): "EdDSA" | "ES256" {
  if (key.type !== "private") throw new TypeError("a DPoP key must be the agent's private key");
  if (key.asymmetricKeyType === "ed25519") return "EdDSA";
  if (key.asymmetricKeyType === "ec" && key.asymmetricKeyDetails?.namedCurve === "prime256v1") return "ES256";
  throw new TypeError("a DPoP key must be an Ed25519 or P-256 key");
}

/** A URL as a proof's `htu` carries it and as a verifier compares it: no query, no fragment;
 * scheme and host in lower case and the default port dropped (WHATWG URL normalisation). */
export function proofUri(url: string | URL): string {
  const parsed = new URL(url);
  parsed.search = "";
  parsed.hash = "";
  return parsed.href;
}

/** `ath`: base64url(SHA-256(access token)). */
function tokenHash(token: string): string {
  return createHash("sha256").update(token).digest("base64url");
}

/** A proof that is not good for this request; `message` says why (never the proof itself). */
export class ProofRejected extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProofRejected";
  }
}

export interface ProofVerifierOptions {
  /** How old (or how far ahead) a proof's `iat` may be, in seconds (default 60). */
  maxAgeSeconds?: number;
  /** How many spent proofs are remembered at most (default 50 000); full, new proofs are
   * refused until old ones age out, never forgotten early (they could be replayed then). */
  maxProofs?: number;
  /** How many of them one user's (the token's `sub`) agents may hold (default 5 000). */
  maxProofsPerUser?: number;
  /** The clock (tests). */
  now?: () => Date;
}

const MAX_PROOF_BYTES = 4096;
const MAX_JTI_LENGTH = 128;

/**
 * Verifies DPoP proofs for a key-bound token (signature by the embedded public key, typ, alg,
 * the key's thumbprint against `cnf.jkt`, htm, htu, ath, freshness) and spends each `jti`
 * once: a replayed proof is refused while it is fresh enough to verify.
 */
export class ProofVerifier {
  readonly #maxAge: number;
  readonly #capacity: number;
  readonly #perUser: number;
  readonly #now: () => Date;
  /** `jkt jti` -> [forget at (ms), user]; in insertion order, which is expiry order. */
  readonly #spent = new Map<string, [number, string]>();
  readonly #users = new Map<string, number>();

  constructor(options: ProofVerifierOptions = {}) {
    this.#maxAge = options.maxAgeSeconds ?? 60;
    this.#capacity = options.maxProofs ?? 50_000;
    this.#perUser = Math.min(options.maxProofsPerUser ?? 5_000, this.#capacity);
    this.#now = options.now ?? (() => new Date());
  }

  /** How many spent proofs are remembered now. */
  get size(): number {
    return this.#spent.size;
  }

  /** Resolves when `proof` is good for this request and was not used before (it is spent
   * then); rejects with ProofRejected otherwise. `user` is whose agents' quota it counts on. */
  async verify(
    proof: string | undefined,
    expected: { jkt: string; method: string; url: string | URL; accessToken: string; user: string },
  ): Promise<void> {
    if (!proof) throw new ProofRejected("the token is bound to a key: a DPoP proof is required");
    if (proof.length > MAX_PROOF_BYTES) throw new ProofRejected("the DPoP proof is too large");
    const now = this.#now();
    let payload;
    let header;
    try {
      ({ payload, protectedHeader: header } = await jwtVerify(proof, EmbeddedJWK, {
        typ: "dpop+jwt",
        algorithms: [...PROOF_ALGORITHMS],
        requiredClaims: ["jti", "htm", "htu", "iat"],
        currentDate: now,
      }));
    } catch (error) {
      if (error instanceof errors.JOSEError) throw new ProofRejected("the DPoP proof does not verify");
      throw error;
    }
    if ((await calculateJwkThumbprint(header.jwk!, "sha256")) !== expected.jkt) {
      throw new ProofRejected("the DPoP proof key is not the key the token is bound to");
    }
    if (payload["htm"] !== expected.method.toUpperCase()) {
      throw new ProofRejected("the DPoP proof is for another method");
    }
    const htu = payload["htu"];
    if (typeof htu !== "string" || !sameUri(htu, expected.url)) {
      throw new ProofRejected("the DPoP proof is for another URL");
    }
    if (payload["ath"] !== tokenHash(expected.accessToken)) {
      throw new ProofRejected("the DPoP proof is not bound to this token (ath)");
    }
    const seconds = now.getTime() / 1000;
    if (Math.abs(seconds - (payload.iat ?? 0)) > this.#maxAge) {
      throw new ProofRejected("the DPoP proof is stale or from the future");
    }
    const jti = payload.jti ?? "";
    if (jti.length > MAX_JTI_LENGTH)
      throw new ProofRejected(`the DPoP proof's jti is over ${MAX_JTI_LENGTH}`);
    this.#spend(`${expected.jkt} ${jti}`, expected.user, now.getTime());
  }

  #spend(key: string, user: string, now: number): void {
    for (const [first, [until, owner]] of this.#spent) {
      if (until > now) break;
      this.#spent.delete(first);
      this.#forget(owner);
    }
    if (this.#spent.has(key)) throw new ProofRejected("the DPoP proof was used already");
    if ((this.#users.get(user) ?? 0) >= this.#perUser) {
      throw new ProofRejected("too many DPoP proofs of this user's agents at once; retry shortly");
    }
    if (this.#spent.size >= this.#capacity) {
      throw new ProofRejected("too many DPoP proofs at once; retry shortly with a new proof");
    }
    // iat may be maxAge ahead, and maxAge old at most: a proof verifies for 2 x maxAge.
    this.#spent.set(key, [now + 2 * this.#maxAge * 1000, user]);
    this.#users.set(user, (this.#users.get(user) ?? 0) + 1);
  }

  #forget(user: string): void {
    const left = (this.#users.get(user) ?? 1) - 1;
    if (left > 0) this.#users.set(user, left);
    else this.#users.delete(user);
  }
}

function sameUri(htu: string, url: string | URL): boolean {
  try {
    return proofUri(htu) === proofUri(url);
  } catch {
    return false; // not a URL
  }
}
