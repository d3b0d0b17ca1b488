// @agentid/client against a real agentid server, started by tests/integration/test_typescript_client.py,
// which passes AGENTID_TEST_TARGET, AGENTID_TEST_USER_TOKEN (alice: tickets.* payments.transfer
// agentid.delegate), AGENTID_TEST_CHECK_KEY (role check), AGENTID_TEST_ADMIN_KEY (role admin),
// AGENTID_TEST_ISSUER and AGENTID_TEST_JWKS_URL (the HTTP door's jwks_uri). The server has the risk
// rule large-transfer: payments.transfer when context.amount > 1000. Tokens are never printed.
import { test } from "node:test";
import assert from "node:assert/strict";
import { env as testEnv, rejection } from "./support.mjs";
import { generateKeyPairSync } from "node:crypto";
import { readFileSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import {
  AgentIdError,
  AgentTokenVerifier,
  AgentState,
  Client,
  Code,
  ContextError,
  Decision,
  Reason,
  RevocationWatcher,
  StepUpState,
  TokenRejected,
  WatcherNotReady,
  WatcherStopped,
  jwkThumbprint,
} from "../dist/index.js";

const env = (name) => testEnv(name, "tests/integration/test_typescript_client.py");
const target = env("AGENTID_TEST_TARGET");
const userToken = env("AGENTID_TEST_USER_TOKEN");
const checkKey = env("AGENTID_TEST_CHECK_KEY");
const adminKey = env("AGENTID_TEST_ADMIN_KEY");
const issuer = env("AGENTID_TEST_ISSUER");
const jwksUrl = env("AGENTID_TEST_JWKS_URL");
const tlsTarget = env("AGENTID_TEST_TLS_TARGET"); // an mTLS server: its CA, our certificate and key
const [tlsCa, tlsCert, tlsKey] = ["CA", "CERT", "KEY"].map((what) =>
  readFileSync(env(`AGENTID_TEST_TLS_${what}`)),
);

/** A client per credential, closed when the test ends. */
function client(t, credential, options) {
  const made = new Client(target, credential, options);
  t.after(() => made.close());
  return made;
}

test("delegate, then check: allowed in scope, denied out of it", async (t) => {
  const user = client(t, userToken);
  const service = client(t, checkKey);
  const session = await user.delegate("support-bot", ["tickets.read"], { task: "triage", ttlSeconds: 600 });
  assert.match(session.sessionId, /^ses_/);
  assert.deepEqual(session.scopes, ["tickets.read"]);
  assert.equal(typeof session.serial, "bigint");

  const allowed = await service.check(session.token, "tickets.read", "ticket/7");
  assert.equal(allowed.decision, Decision.ALLOW);
  assert.equal(allowed.reason, Reason.GRANTED);
  assert.equal(allowed.matchedScope, "tickets.read");
  assert.equal(allowed.sessionId, session.sessionId);

  const denied = await service.check(session.token, "tickets.delete", "ticket/7");
  assert.equal(denied.decision, Decision.DENY);
  assert.equal(denied.reason, Reason.SCOPE_NOT_GRANTED);
});

test("errors carry the gRPC code and the ErrorInfo reason and metadata", async (t) => {
  const user = client(t, userToken);
  // support-bot may hold payments.*, alice holds payments.transfer only: an escalation.
  const escalation = await rejection(user.delegate("support-bot", ["tickets.read", "payments.refund"]));
  assert.ok(escalation instanceof AgentIdError, String(escalation));
  assert.equal(escalation.code, Code.PermissionDenied);
  assert.equal(escalation.codeName, "PERMISSION_DENIED");
  assert.equal(escalation.reason, "SCOPE_ESCALATION");
  assert.equal(escalation.domain, "agentid");
  assert.equal(escalation.metadata.scopes, "payments.refund");

  const unknown = await rejection(user.delegate("no-such-bot", ["tickets.read"]));
  assert.equal(unknown.codeName, "NOT_FOUND");
  assert.equal(unknown.reason, "AGENT_NOT_REGISTERED");

  const malformed = await rejection(user.delegate("support-bot", ["Not A Scope!"]));
  assert.equal(malformed.code, Code.InvalidArgument);
  assert.ok(malformed.fieldViolations.length > 0, "INVALID_ARGUMENT names its fields (BadRequest)");

  const badKey = await rejection(client(t, "not-a-key-0123456789").check("x", "tickets.read"));
  assert.equal(badKey.code, Code.Unauthenticated);
  assert.ok(badKey.reason, "an UNAUTHENTICATED error has a reason too");
  assert.ok(!badKey.message.includes("not-a-key"), "the credential is not echoed");
});

test("a risk rule answers STEP_UP_REQUIRED; the agent asks with StepUp", async (t) => {
  const user = client(t, userToken);
  const service = client(t, checkKey);
  const session = await user.delegate("support-bot", ["payments.transfer"]);
  const small = await service.check(session.token, "payments.transfer", "account/42", {
    context: { amount: 50 },
  });
  assert.equal(small.decision, Decision.ALLOW);

  const context = { amount: 5000, currency: "EUR", lines: [{ sku: "a", n: 1 }], note: null, urgent: true };
  const large = await service.check(session.token, "payments.transfer", "account/42", { context });
  assert.equal(large.decision, Decision.STEP_UP_REQUIRED);
  assert.equal(large.reason, Reason.HIGH_RISK);
  assert.equal(large.riskRule, "large-transfer");

  const agent = client(t, session.token);
  const stepUp = await agent.stepUp("payments.transfer", "account/42", {
    context,
    bindingMessage: "Pay 5000 EUR",
  });
  assert.match(stepUp.id, /^stp_/);
  assert.equal(stepUp.state, StepUpState.PENDING);
  assert.equal(stepUp.riskRule, "large-transfer");
  assert.deepEqual(stepUp.context, context);
  const [seen] = await collect(agent.watchStepUps(stepUp.id, { currentOnly: true }));
  assert.equal(seen.id, stepUp.id);
});

test("a context that a Struct cannot carry is refused before anything is sent", async (t) => {
  // Nothing listens on port 1: a refused context never gets as far as connecting there, and the
  // real server is not asked either.
  const real = client(t, checkKey);
  const offline = new Client("127.0.0.1:1", checkKey);
  t.after(() => offline.close());
  const cyclic = { amount: 5 };
  cyclic.self = cyclic;
  const bad = {
    undefined: { amount: undefined },
    function: { amount: () => 5 },
    bigint: { amount: 5000n },
    NaN: { amount: NaN },
    Infinity: { amount: -Infinity },
    "a Date": { when: new Date() },
    "a Map": { m: new Map() },
    "a cycle": cyclic,
    "a nested bigint": { lines: [{ n: 1n }] },
    "a symbol": { s: Symbol("x") },
  };
  for (const [what, context] of Object.entries(bad)) {
    for (const caller of [offline, real]) {
      const error = await rejection(caller.check("token", "payments.transfer", "", { context }));
      assert.ok(error instanceof ContextError, `${what}: ${error}`);
    }
    const error = await rejection(offline.stepUp("payments.transfer", "", { context }));
    assert.ok(error instanceof ContextError, `${what} (StepUp): ${error}`);
  }
  assert.match(
    (await rejection(offline.check("t", "a", "", { context: { amount: 1n } }))).message,
    /context\.amount: a bigint/,
  );
  // A good one is sent as is: a JSON value the risk rule reads.
  assert.ok(await real.check("not-a-token", "payments.transfer", "", { context: { amount: 1 } }));
});

test("plaintext to a host that is not this machine is refused before the credential is sent", async (t) => {
  assert.throws(() => new Client("agentid.example.com:50051", checkKey), /not on this machine/);
  assert.throws(() => new Client("dns:///agentid.example.com:50051", checkKey), /not on this machine/);
  assert.throws(() => new Client("10.1.2.3:50051", checkKey), /not on this machine/);
  // A real listener on this machine's own non-loopback address: nothing reaches it when refused.
  const address = Object.values(os.networkInterfaces())
    .flat()
    .find((a) => a && a.family === "IPv4" && !a.internal)?.address;
  if (address === undefined) {
    t.diagnostic("no non-loopback IPv4 address here: the listener half is skipped");
    return;
  }
  let connections = 0;
  const listener = net.createServer((socket) => {
    connections += 1;
    socket.destroy();
  });
  await new Promise((resolve) => listener.listen(0, address, resolve));
  t.after(() => listener.close());
  const remote = `${address}:${listener.address().port}`;
  assert.throws(() => new Client(remote, checkKey), /not on this machine/);
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert.equal(connections, 0);
  // Told so (a network that encrypts by itself), it connects.
  const allowed = client(t, checkKey, { plaintext: true });
  assert.ok(allowed);
  const told = new Client(remote, checkKey, { plaintext: true });
  t.after(() => told.close());
  await rejection(told.getJwks({ timeoutMs: 2000 }));
  assert.equal(connections, 1);
});

test("TLS: the server's CA and, for mTLS, a client certificate; the credential travels inside", async (t) => {
  const tls = { ca: tlsCa, cert: tlsCert, key: tlsKey };
  const user = new Client(tlsTarget, userToken, { tls });
  t.after(() => user.close());
  const session = await user.delegate("support-bot", ["tickets.read"]);
  assert.match(session.sessionId, /^ses_/);
  // TLS to a host that is not this machine is allowed (nothing is sent until a call).
  new Client("agentid.example.com:443", checkKey, { tls: true }).close();

  const noCertificate = new Client(tlsTarget, userToken, { tls: { ca: tlsCa } });
  t.after(() => noCertificate.close());
  // Refused by the server's handshake: with TLS 1.3 the client learns it only as the server
  // closes the connection (an HTTP/2 CANCEL, which gRPC's mapping calls CANCELLED).
  const refused = await rejection(noCertificate.getJwks({ timeoutMs: 5000 }));
  assert.ok([Code.Unavailable, Code.Canceled].includes(refused.code), refused.message);
  const systemCas = new Client(tlsTarget, userToken, { tls: true }); // our test CA is not among them
  t.after(() => systemCas.close());
  assert.equal((await rejection(systemCas.getJwks({ timeoutMs: 5000 }))).code, Code.Unavailable);
});

test("the revocation watcher sees a revoke, resumes by sequence, and stops on a refused key", async (t) => {
  const user = client(t, userToken);
  const watcher = new RevocationWatcher(client(t, checkKey), { retryDelayMs: 50 });
  assert.throws(() => watcher.isRevoked(1), WatcherNotReady);
  watcher.start();
  t.after(() => watcher.stop());
  await watcher.waitFor(0);

  const session = await user.delegate("support-bot", ["tickets.read"]);
  const other = await user.delegate("support-bot", ["tickets.read"]);
  assert.equal(watcher.isRevoked(session.serial), false);
  const revoked = await user.revoke({ sessionId: session.sessionId }, { reason: "test" });
  assert.deepEqual(revoked.sessionIds, [session.sessionId]);
  await watcher.waitFor(revoked.revocationSequence);
  assert.equal(watcher.isRevoked(session.serial), true);
  assert.equal(watcher.isRevoked(Number(session.serial)), true);
  assert.equal(watcher.isRevoked(other.serial), false);

  // A second watcher from a snapshot holds the same set.
  const late = new RevocationWatcher(client(t, checkKey));
  late.start();
  t.after(() => late.stop());
  await late.waitFor(revoked.revocationSequence);
  assert.equal(late.isRevoked(session.serial), true);
  assert.equal(late.isRevoked(other.serial), false);

  // A wait for a sequence not written yet ends with its signal.
  await assert.rejects(
    watcher.waitFor(revoked.revocationSequence + 1000n, { signal: AbortSignal.timeout(50) }),
  );

  await watcher.stop();
  assert.throws(() => watcher.isRevoked(session.serial), WatcherStopped);

  const refused = new RevocationWatcher(client(t, "not-a-key-0123456789"));
  refused.start();
  await assert.rejects(refused.waitFor(0), WatcherStopped);
  assert.equal(refused.failure.code, Code.Unauthenticated);
  assert.throws(() => refused.isRevoked(1), WatcherStopped);
});

test("the watcher resumes after a dropped connection with the events it missed", async (t) => {
  // A TCP relay to the server that the test can cut, as a dead network path would.
  const sockets = new Set();
  const relay = net.createServer((inbound) => {
    const [host, port] = [
      target.slice(0, target.lastIndexOf(":")),
      Number(target.slice(target.lastIndexOf(":") + 1)),
    ];
    const outbound = net.connect(port, host);
    for (const socket of [inbound, outbound]) {
      sockets.add(socket);
      socket.on("error", () => {});
      socket.on("close", () => sockets.delete(socket));
    }
    inbound.pipe(outbound).pipe(inbound);
  });
  await new Promise((resolve) => relay.listen(0, "127.0.0.1", resolve));
  t.after(() => relay.close());
  const logs = [];
  const relayed = new Client(`127.0.0.1:${relay.address().port}`, checkKey);
  t.after(() => relayed.close());
  const watcher = new RevocationWatcher(relayed, {
    retryDelayMs: 20,
    log: (level, message) => logs.push(message),
  });
  watcher.start();
  t.after(() => watcher.stop());
  await watcher.waitFor(0);

  const user = client(t, userToken);
  const first = await user.delegate("support-bot", ["tickets.read"]);
  const second = await user.delegate("support-bot", ["tickets.read"]);
  const one = await user.revoke({ sessionId: first.sessionId });
  await watcher.waitFor(one.revocationSequence);
  for (const socket of sockets) socket.destroy(); // the stream dies
  const two = await user.revoke({ sessionId: second.sessionId }); // while it is away
  await watcher.waitFor(two.revocationSequence);
  assert.equal(watcher.sequence, two.revocationSequence);
  assert.equal(watcher.isRevoked(first.serial), true);
  assert.equal(watcher.isRevoked(second.serial), true);
  assert.ok(
    logs.some((line) => line.includes(`resuming after ${one.revocationSequence}`)),
    logs.join("\n"),
  );
});

test("token helpers: claims verified against the JWKS, with the watcher; jkt thumbprints", async (t) => {
  const user = client(t, userToken);
  const service = client(t, checkKey);
  const watcher = new RevocationWatcher(service);
  watcher.start();
  t.after(() => watcher.stop());
  await watcher.waitFor(0);

  const { publicKey } = generateKeyPairSync("ed25519");
  const jkt = await jwkThumbprint(publicKey.export({ format: "jwk" }));
  const session = await user.delegate("support-bot", ["tickets.read", "tickets.comment.add"], {
    task: "triage",
    audiences: ["payments-api"],
    jkt,
  });

  for (const keys of [service, new URL(jwksUrl)]) {
    const verifier = new AgentTokenVerifier({ issuer, keys, audience: "payments-api", watcher });
    const claims = await verifier.verify(session.token);
    assert.equal(claims.sub, "alice");
    assert.equal(claims.act.sub, "support-bot");
    assert.equal(claims.act.sid, session.sessionId);
    assert.equal(claims.jti, session.sessionId);
    assert.equal(BigInt(claims.sn), session.serial);
    assert.deepEqual(claims.scopes, ["tickets.read", "tickets.comment.add"]);
    assert.deepEqual(claims.aud, ["payments-api"]);
    assert.equal(claims.task, "triage");
    assert.deepEqual(claims.cnf, { jkt });
  }

  const verifier = new AgentTokenVerifier({ issuer, keys: service, audience: "payments-api", watcher });
  const reason = async (promise) => {
    const error = await rejection(promise);
    assert.ok(error instanceof TokenRejected, String(error));
    return error.reason;
  };
  const [header, payload, signature] = session.token.split(".");
  const claims = JSON.parse(Buffer.from(payload, "base64url").toString());
  const forged = [
    header,
    Buffer.from(JSON.stringify({ ...claims, scope: "*" })).toString("base64url"),
    signature,
  ].join(".");
  assert.equal(await reason(verifier.verify(forged)), "SIGNATURE_INVALID");
  assert.equal(await reason(verifier.verify("not.a.token")), "TOKEN_MALFORMED");
  const otherIssuer = new AgentTokenVerifier({
    issuer: "https://elsewhere.example",
    keys: service,
    audience: "payments-api",
  });
  assert.equal(await reason(otherIssuer.verify(session.token)), "TOKEN_MALFORMED"); // as Check says
  const otherAudience = new AgentTokenVerifier({ issuer, keys: service, audience: "crm" });
  assert.equal(await reason(otherAudience.verify(session.token)), "AUDIENCE_MISMATCH");
  const later = new AgentTokenVerifier({
    issuer,
    keys: service,
    audience: "payments-api",
    now: () => new Date((claims.exp + 1) * 1000),
  });
  assert.equal(await reason(later.verify(session.token)), "TOKEN_EXPIRED");
  const atExpiry = new AgentTokenVerifier({
    issuer,
    keys: service,
    audience: "payments-api",
    now: () => new Date(claims.exp * 1000),
  });
  assert.equal(await reason(atExpiry.verify(session.token)), "TOKEN_EXPIRED", "no leeway on exp");
  const earlier = new AgentTokenVerifier({
    issuer,
    keys: service,
    audience: "payments-api",
    now: () => new Date((claims.nbf - 60) * 1000),
  });
  assert.equal(await reason(earlier.verify(session.token)), "TOKEN_NOT_YET_VALID");

  const revoked = await user.revoke({ sessionId: session.sessionId });
  await watcher.waitFor(revoked.revocationSequence);
  assert.equal(await reason(verifier.verify(session.token)), "SESSION_REVOKED");

  const jwks = await service.getJwks();
  assert.ok(jwks.keys.length > 0 && jwks.keys.every((key) => key.kid && !("d" in key)));
});

test("a key-bound agent calls with its proof key (DPoP); without it, it is refused", async (t) => {
  const user = client(t, userToken);
  for (const [type, options] of [
    ["ed25519", {}],
    ["ec", { namedCurve: "P-256" }],
  ]) {
    const { publicKey, privateKey } = generateKeyPairSync(type, options);
    const jkt = await jwkThumbprint(publicKey.export({ format: "jwk" }));
    const session = await user.delegate("support-bot", ["tickets.read"], { jkt });
    const thief = client(t, session.token);
    const stolen = await rejection(thief.stepUp("tickets.read", "ticket/1"));
    assert.equal(stolen.reason, "PROOF_OF_POSSESSION_FAILED", stolen.message);
    // A gRPC target with a resolver scheme, as deployments write them.
    const agent = new Client(`dns:///${target}`, session.token, { proofKey: privateKey });
    t.after(() => agent.close());
    assert.match((await agent.stepUp("tickets.read", "ticket/1")).id, /^stp_/, type);
    const done = await agent.revoke({ sessionId: session.sessionId }, { reason: "task_complete" });
    assert.deepEqual(done.sessionIds, [session.sessionId]);
  }
  assert.throws(
    () => new Client(target, "x", { proofKey: generateKeyPairSync("ed25519").publicKey }),
    /private key/,
  );
});

test("the agent registry and sessions", async (t) => {
  const admin = client(t, adminKey);
  const user = client(t, userToken);
  const id = `ts-bot-${process.pid}`;
  const created = await admin.createAgent(id, ["tickets.read"], {
    displayName: "TS bot",
    owners: ["alice"],
    maxTtlSeconds: 600,
  });
  assert.equal(created.id, id);
  assert.equal(created.state, AgentState.ACTIVE);
  assert.equal(created.maxTtl.seconds, 600n);
  assert.equal((await admin.getAgent(id)).displayName, "TS bot");
  const updated = await admin.updateAgent({ id, displayName: "TypeScript bot" }, ["display_name"]);
  assert.equal(updated.displayName, "TypeScript bot");
  assert.ok((await collect(admin.listAgents())).some((agent) => agent.id === id));

  const session = await user.delegate(id, ["tickets.read"]);
  const sessions = await collect(admin.listSessions({ agentId: id }));
  assert.deepEqual(
    sessions.map((s) => s.sessionId),
    [session.sessionId],
  );

  const disabled = await admin.disableAgent(id, { reason: "test" });
  assert.equal(disabled.agent.state, AgentState.DISABLED);
  assert.deepEqual(disabled.revokedSessionIds, [session.sessionId]);
  const refused = await rejection(user.delegate(id, ["tickets.read"]));
  assert.equal(refused.reason, "AGENT_DISABLED");
  assert.equal((await admin.enableAgent(id)).state, AgentState.ACTIVE);
  assert.ok(await user.delegate(id, ["tickets.read"]));
  const duplicate = await rejection(admin.createAgent(id, ["tickets.read"]));
  assert.equal(duplicate.code, Code.AlreadyExists);
});

async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}
