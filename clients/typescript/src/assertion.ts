/** Client assertions (RFC 7523 section 2.2, `private_key_jwt`): how an agent with keys proves
 * itself at agentid's token endpoint, or in Delegate's `actorToken`. */

import { type KeyObject, randomUUID } from "node:crypto";
import { SignJWT } from "jose";

export interface ClientAssertionOptions {
  /** The assertion's `aud`: agentid's issuer or its token endpoint URL. */
  audience: string;
  /** The `kid` of the key in the agent's JWKS, when it has several. */
  kid?: string;
  /** Seconds until it expires (default 60; agentid accepts 5 minutes at most). */
  lifetimeSeconds?: number;
}

/** A fresh client assertion of agent `agentId` (iss = sub = the agent id, a new `jti`), signed
 * with its private key: Ed25519 (EdDSA), P-256 (ES256), RSA (RS256) or RSA-PSS (PS256). */
export async function clientAssertion(
  agentId: string,
  key: KeyObject,
  options: ClientAssertionOptions,
): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({})
    .setProtectedHeader({
      alg: assertionAlgorithm(key),
      typ: "JWT",
      ...(options.kid ? { kid: options.kid } : {}),
    })
    .setIssuer(agentId)
    .setSubject(agentId)
    .setAudience(options.audience)
    .setJti(randomUUID())
    .setIssuedAt(now)
    .setExpirationTime(now + (options.lifetimeSeconds ?? 60))
    .sign(key);
}

function assertionAlgorithm(key: KeyObject): string {
  if (key.type !== "private")
    throw new TypeError("a client assertion is signed with the agent's private key");
  switch (key.asymmetricKeyType) {
    case "ed25519":
      return "EdDSA";
    case "rsa":
      return "RS256";
    case "rsa-pss":
      return "PS256";
    case "ec":
      if (key.asymmetricKeyDetails?.namedCurve === "prime256v1") return "ES256";
  }
  throw new TypeError("a client assertion key is Ed25519, P-256, RSA or RSA-PSS");
}
