// A JWKS consumer that knows nothing of agentid: jose's createRemoteJWKSet verifies agent tokens
// from the jwks_uri alone. Driven by tests/http/test_discovery.py, which starts the server and
// passes AGENTID_JWKS_URL, AGENTID_ISSUER, AGENTID_TOKENS (space-separated agent tokens) and
// AGENTID_NOW (seconds since the epoch on the server's clock).
import { test } from "node:test";
import assert from "node:assert/strict";
import { createRemoteJWKSet, jwtVerify } from "jose";

const url = process.env.AGENTID_JWKS_URL;
const issuer = process.env.AGENTID_ISSUER;
const tokens = (process.env.AGENTID_TOKENS ?? "").split(" ").filter(Boolean);
// The server under test runs on an injected clock: times are checked against it.
const currentDate = new Date(Number(process.env.AGENTID_NOW ?? Date.now() / 1000) * 1000);

test("every agent token verifies against the remote JWKS", async () => {
  assert.ok(url && issuer && tokens.length > 0, "AGENTID_JWKS_URL, AGENTID_ISSUER, AGENTID_TOKENS");
  const jwks = createRemoteJWKSet(new URL(url));
  for (const token of tokens) {
    const { payload, protectedHeader } = await jwtVerify(token, jwks, {
      issuer,
      typ: "agent+jwt",
      algorithms: ["EdDSA", "ES256"],
      currentDate,
    });
    assert.equal(typeof payload.act?.sub, "string");
    assert.ok(protectedHeader.kid);
  }
});

test("a token with a changed payload does not verify", async () => {
  const jwks = createRemoteJWKSet(new URL(url));
  const [header, payload, signature] = tokens[0].split(".");
  const claims = JSON.parse(Buffer.from(payload, "base64url").toString());
  claims.scope = "everything.*";
  const forged = [header, Buffer.from(JSON.stringify(claims)).toString("base64url"), signature];
  await assert.rejects(jwtVerify(forged.join("."), jwks, { issuer, currentDate }));
});
