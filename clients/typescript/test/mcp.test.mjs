// @agentid/client/mcp with the official TypeScript MCP SDK, against a real agentid server started by
// tests/integration/test_typescript_mcp.py, which passes AGENTID_TEST_TARGET (gRPC),
// AGENTID_TEST_PUBLIC_URL (the HTTP door: JWKS, token exchange, console), AGENTID_TEST_ISSUER,
// AGENTID_TEST_USER_TOKEN (alice: tickets.* payments.transfer mcp.*, a fresh login),
// AGENTID_TEST_MCP_CHECK_KEY (service mcp-tools, role check, audience = this MCP server's URL),
// AGENTID_TEST_ADMIN_KEY and AGENTID_TEST_MCP_PORT (where this file serves the MCP server). The
// agent mcp-bot may hold tickets.* payments.* mcp.*; the risk rule large-transfer fires for
// payments.transfer when context.amount > 1000. Tokens are never printed.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { env as testEnv, rejection } from "./support.mjs";
import { generateKeyPairSync, randomUUID } from "node:crypto";
import { Client as McpClient } from "@modelcontextprotocol/sdk/client/index.js";
import {
  StreamableHTTPClientTransport,
  StreamableHTTPError,
} from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { InvalidClientError, InvalidScopeError } from "@modelcontextprotocol/sdk/server/auth/errors.js";
import { createMcpExpressApp } from "@modelcontextprotocol/sdk/server/express.js";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import {
  ErrorCode,
  isInitializeRequest,
  McpError,
  UrlElicitationRequiredError,
} from "@modelcontextprotocol/sdk/types.js";
import * as z from "zod";
import { Client, Decision, EventType, RevocationWatcher, StepUpState } from "@agentid/client";
import { McpGuard, requestMcpToken } from "@agentid/client/mcp";

const env = (name) => testEnv(name, "tests/integration/test_typescript_mcp.py");
const target = env("AGENTID_TEST_TARGET");
const publicUrl = env("AGENTID_TEST_PUBLIC_URL");
const issuer = env("AGENTID_TEST_ISSUER");
const userToken = env("AGENTID_TEST_USER_TOKEN");
const checkKey = env("AGENTID_TEST_MCP_CHECK_KEY");
const adminKey = env("AGENTID_TEST_ADMIN_KEY");
const origin = `http://127.0.0.1:${env("AGENTID_TEST_MCP_PORT")}`;
const resource = `${origin}/mcp`;

// The protected MCP server: four tools (ping undeclared), stateful sessions as the SDK's
// examples keep them, and /bare, connected through the guard without its middleware.
const runs = [];
function toolServer() {
  const server = new McpServer({ name: "tools", version: "1.0.0" });
  const text = (value) => ({ content: [{ type: "text", text: value }] });
  server.registerTool("read_ticket", { inputSchema: { id: z.string() } }, async ({ id }, extra) => {
    runs.push("read_ticket");
    const who = extra.authInfo?.extra?.agentid;
    return text(`ticket ${id} read by ${who?.agentId} for ${who?.userId} in ${who?.sessionId}`);
  });
  server.registerTool("delete_ticket", { inputSchema: { id: z.string() } }, async ({ id }) => {
    runs.push("delete_ticket");
    return text(`ticket ${id} deleted`);
  });
  server.registerTool(
    "transfer",
    { inputSchema: { account_id: z.string().optional(), amount: z.number() } },
    async ({ account_id, amount }) => {
      runs.push("transfer");
      return text(`${amount} sent from ${account_id}`);
    },
  );
  server.registerTool("ping", {}, async () => {
    runs.push("ping");
    return text("pong");
  });
  return server;
}

const checker = new Client(target, checkKey);
const watcher = new RevocationWatcher(checker);
const guard = new McpGuard({
  resourceUrl: resource,
  serverName: "tools",
  issuer,
  publicUrl,
  keys: new URL(`${publicUrl}/.well-known/jwks.json`),
  client: checker,
  watcher,
  tools: {
    read_ticket: { action: "tickets.read", resource: "ticket/{id}" },
    delete_ticket: { action: "tickets.delete", resource: "ticket/{id}" },
    transfer: { action: "payments.transfer", resource: "account/{account_id}", context: ["amount"] },
  },
});
const app = createMcpExpressApp();
app.use(guard.metadataPath, guard.metadata());
const sessions = new Map();
app.all("/mcp", guard.middleware(), async (req, res) => {
  let transport = sessions.get(req.headers["mcp-session-id"]);
  if (transport === undefined) {
    if (req.method !== "POST" || !isInitializeRequest(req.body)) {
      res.status(400).json({ jsonrpc: "2.0", id: null, error: { code: -32000, message: "no session" } });
      return;
    }
    transport = new StreamableHTTPServerTransport({
      sessionIdGenerator: randomUUID,
      onsessioninitialized: (id) => sessions.set(id, transport),
    });
    await guard.connect(toolServer(), transport);
  }
  await transport.handleRequest(req, res, req.body);
});
app.post("/bare", async (req, res) => {
  const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
  await guard.connect(toolServer(), transport);
  await transport.handleRequest(req, res, req.body);
});
let listener;

before(async () => {
  watcher.start();
  await watcher.waitFor(0);
  await new Promise((resolve, reject) => {
    listener = app.listen(Number(new URL(origin).port), "127.0.0.1", resolve).on("error", reject);
  });
});

after(async () => {
  for (const transport of sessions.values()) await transport.close();
  await new Promise((resolve) => listener.close(resolve));
  await watcher.stop();
  checker.close();
});

/** Every HTTP exchange the agent makes (its request init and the response), newest last. */
const exchanges = [];
async function recordingFetch(url, init) {
  const response = await fetch(url, init);
  exchanges.push({ url: String(url), init, response });
  return response;
}
const lastResponse = () => exchanges[exchanges.length - 1].response;

/** A token for this MCP server, exchanged at agentid for mcp-bot (or options.clientId). */
function mcpToken(scope, options = {}) {
  return requestMcpToken({
    tokenEndpoint: `${publicUrl}/oauth2/token`,
    clientId: "mcp-bot",
    subjectToken: userToken,
    resource,
    scope,
    fetch: recordingFetch,
    ...options,
  });
}

/** The SDK's own client over streamable HTTP, presenting `token`; closed when the test ends. */
async function connect(t, token, { urlElicitation = false, url = resource } = {}) {
  const capabilities = urlElicitation ? { elicitation: { url: {} } } : {};
  const client = new McpClient({ name: "test-agent", version: "1.0.0" }, { capabilities });
  const options = token === undefined ? {} : { fetch: token.fetch };
  await client.connect(new StreamableHTTPClientTransport(new URL(url), options));
  t.after(() => client.close());
  return client;
}

function user(t) {
  const made = new Client(target, userToken);
  t.after(() => made.close());
  return made;
}

const claimsOf = (token) => JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString());
const text = (result) => result.content.map((part) => part.text).join("");

test("the protected-resource metadata names agentid; a request without a token is 401 pointing at it", async () => {
  const metadataUrl = `${origin}/.well-known/oauth-protected-resource/mcp`;
  assert.equal(guard.metadataUrl, metadataUrl);
  const metadata = await (await fetch(metadataUrl)).json();
  assert.deepEqual(metadata, {
    resource,
    authorization_servers: [issuer],
    bearer_methods_supported: ["header"],
    resource_name: "tools",
    dpop_signing_alg_values_supported: ["EdDSA", "ES256", "RS256", "PS256"],
  });
  const initialize = {
    jsonrpc: "2.0",
    id: 1,
    method: "initialize",
    params: { protocolVersion: "2025-11-25", capabilities: {}, clientInfo: { name: "x", version: "1" } },
  };
  const response = await fetch(resource, {
    method: "POST",
    headers: { "content-type": "application/json", accept: "application/json, text/event-stream" },
    body: JSON.stringify(initialize),
  });
  assert.equal(response.status, 401);
  const challenge = response.headers.get("www-authenticate");
  assert.match(challenge, /^Bearer error="invalid_token"/);
  assert.ok(challenge.includes(`resource_metadata="${metadataUrl}"`), challenge);

  // A declaration that could never make a Check is refused at start, not at a call.
  const base = { resourceUrl: resource, serverName: "tools", issuer, keys: checker, client: checker };
  assert.throws(() => new McpGuard({ ...base, serverName: "My Tools" }), /one action segment/);
  assert.throws(() => new McpGuard({ ...base, tools: { t: { action: "Pay!" } } }), /is not an action/);
  assert.throws(() => new McpGuard({ ...base, tools: { t: { resource: "account/{id" } } }), /unbalanced/);
  assert.throws(() => new McpGuard({ ...base, tools: { t: { resource: "a/{}" } } }), /empty \{\}/);
  assert.throws(() => new McpGuard({ ...base, tools: { t: { context: { amount: "" } } } }), /non-empty/);
  assert.throws(() => new McpGuard({ ...base, resourceUrl: `${resource}#x` }), /fragment/);
});

test("an allowed tool call runs, audited with session, user and scope; the tool sees who asks", async (t) => {
  const token = await mcpToken("tickets.read");
  assert.equal(token.tokenType, "Bearer");
  assert.deepEqual(token.scopes, ["tickets.read"]);
  assert.deepEqual(claimsOf(token.accessToken).aud, [resource]);
  const client = await connect(t, token);
  const tools = await client.listTools();
  assert.deepEqual(tools.tools.map((tool) => tool.name).sort(), [
    "delete_ticket",
    "ping",
    "read_ticket",
    "transfer",
  ]);

  const result = await client.callTool({ name: "read_ticket", arguments: { id: "7" } });
  const session = claimsOf(token.accessToken).jti;
  assert.equal(result.isError, undefined);
  assert.equal(text(result), `ticket 7 read by mcp-bot for alice in ${session}`);

  const admin = new Client(target, adminKey);
  t.after(() => admin.close());
  const records = [];
  for await (const record of admin.audit({ sessionId: session, eventTypes: [EventType.CHECK] }))
    records.push(record);
  assert.equal(records.length, 1);
  const [record] = records;
  assert.equal(record.action, "tickets.read");
  assert.equal(record.resource, "ticket/7");
  assert.equal(record.decision, Decision.ALLOW);
  assert.equal(record.userId, "alice");
  assert.equal(record.agentId, "mcp-bot");
  assert.deepEqual(record.scopes, ["tickets.read"]);
  assert.equal(record.actorId, "mcp-tools");
});

test("a denied call is the spec's 403 insufficient_scope; an undeclared tool gets the default action", async (t) => {
  const client = await connect(t, await mcpToken("tickets.read"));
  const before = runs.length;
  const denied = await rejection(client.callTool({ name: "delete_ticket", arguments: { id: "7" } }));
  assert.ok(denied instanceof StreamableHTTPError, String(denied));
  assert.equal(denied.code, 403);
  const response = lastResponse();
  assert.equal(response.status, 403);
  const challenge = response.headers.get("www-authenticate");
  assert.match(
    challenge,
    /^Bearer error="insufficient_scope", scope="tickets\.delete:ticket\/7", error_description="[^"]+"/,
  );
  assert.ok(challenge.includes(`resource_metadata="${guard.metadataUrl}"`), challenge);
  const pingDenied = await rejection(client.callTool({ name: "ping", arguments: {} }));
  assert.equal(pingDenied.code, 403);
  assert.match(lastResponse().headers.get("www-authenticate"), /scope="mcp\.tools\.ping"/);
  assert.equal(runs.length, before, "no denied tool ran");

  const pinger = await connect(t, await mcpToken("mcp.tools.ping"));
  assert.equal(text(await pinger.callTool({ name: "ping", arguments: {} })), "pong");
});

test("step-up with a URL-mode client: elicitation, approval, the retry allowed once, the next asks again", async (t) => {
  const client = await connect(t, await mcpToken("payments.transfer"), { urlElicitation: true });
  const small = await client.callTool({ name: "transfer", arguments: { account_id: "42", amount: 50 } });
  assert.equal(text(small), "50 sent from 42");

  const large = { name: "transfer", arguments: { account_id: "42", amount: 5000 } };
  const asked = await rejection(client.callTool(large));
  assert.ok(asked instanceof UrlElicitationRequiredError, String(asked));
  assert.equal(asked.code, ErrorCode.UrlElicitationRequired);
  const [elicitation] = asked.elicitations;
  assert.equal(elicitation.mode, "url");
  assert.match(elicitation.elicitationId, /^stp_/);
  assert.equal(elicitation.url, `${publicUrl}/console/step-ups?step_up=${elicitation.elicitationId}`);
  assert.ok(elicitation.message.includes(elicitation.elicitationId), elicitation.message);

  const alice = user(t);
  const [pending] = await collect(alice.watchStepUps(elicitation.elicitationId, { currentOnly: true }));
  assert.equal(pending.state, StepUpState.PENDING);
  assert.equal(pending.action, "payments.transfer");
  assert.equal(pending.resource, "account/42");
  assert.deepEqual(pending.context, { amount: 5000 });
  assert.match(pending.bindingMessage, /transfer on MCP server tools/);
  const approved = await alice.resolveStepUp(elicitation.elicitationId, true);
  assert.equal(approved.state, StepUpState.APPROVED);

  const count = runs.filter((name) => name === "transfer").length;
  assert.equal(text(await client.callTool(large)), "5000 sent from 42");
  assert.equal(runs.filter((name) => name === "transfer").length, count + 1);

  const again = await rejection(client.callTool(large));
  assert.ok(again instanceof UrlElicitationRequiredError, String(again));
  assert.notEqual(
    again.elicitations[0].elicitationId,
    elicitation.elicitationId,
    "the approval was consumed",
  );
  assert.equal(runs.filter((name) => name === "transfer").length, count + 1);
});

test("step-up with a client that did not declare URL elicitation: a tool error naming the step-up", async (t) => {
  const client = await connect(t, await mcpToken("payments.transfer"));
  const before = runs.length;
  const result = await client.callTool({ name: "transfer", arguments: { account_id: "9", amount: 2000 } });
  assert.equal(result.isError, true);
  const [, id] = /agentid step-up (stp_\w+)/.exec(text(result)) ?? [];
  assert.ok(id, text(result));
  assert.ok(text(result).includes(`${publicUrl}/console/step-ups?step_up=${id}`), text(result));
  assert.equal(runs.length, before);
  await user(t).resolveStepUp(id, true);
  assert.equal(
    text(await client.callTool({ name: "transfer", arguments: { account_id: "9", amount: 2000 } })),
    "2000 sent from 9",
  );
});

test("an argument a declaration names but the call lacks, or cannot encode, refuses the call", async (t) => {
  const client = await connect(t, await mcpToken("tickets.read payments.transfer"));
  const before = runs.length;
  const missing = await rejection(client.callTool({ name: "transfer", arguments: { amount: 5 } }));
  assert.ok(missing instanceof McpError, String(missing));
  assert.equal(missing.code, ErrorCode.InvalidParams);
  assert.match(missing.message, /"account_id" is missing \(the resource names it\)/);
  const noAmount = await rejection(client.callTool({ name: "transfer", arguments: { account_id: "1" } }));
  assert.match(noAmount.message, /"amount" is missing \(the context names it\)/);
  for (const id of ["7/../8", "*", "", "a b"]) {
    const bad = await rejection(client.callTool({ name: "read_ticket", arguments: { id } }));
    assert.equal(bad.code, ErrorCode.InvalidParams, id);
    assert.match(bad.message, /"id" cannot be a resource segment/);
  }
  assert.equal(runs.length, before, "no refused call ran");
});

test("a revoked session is refused on its next call", async (t) => {
  const token = await mcpToken("tickets.read");
  const client = await connect(t, token);
  assert.ok(await client.callTool({ name: "read_ticket", arguments: { id: "1" } }));
  const revoked = await user(t).revoke({ sessionId: claimsOf(token.accessToken).jti });
  await watcher.waitFor(revoked.revocationSequence);
  const refused = await rejection(client.callTool({ name: "read_ticket", arguments: { id: "1" } }));
  assert.equal(refused.code, 401);
  assert.match(
    lastResponse().headers.get("www-authenticate"),
    /error="invalid_token", error_description="SESSION_REVOKED/,
  );
});

test("a token for another resource, or for none, is refused with 401", async (t) => {
  const other = await mcpToken("tickets.read", { resource: `${origin}/other` });
  assert.deepEqual(claimsOf(other.accessToken).aud, [`${origin}/other`]);
  const refused = await rejection(connect(t, other, { url: resource }));
  assert.ok(refused instanceof StreamableHTTPError, String(refused));
  assert.equal(refused.code, 401);
  assert.match(lastResponse().headers.get("www-authenticate"), /AUDIENCE_MISMATCH/);

  const session = await user(t).delegate("mcp-bot", ["tickets.read"]); // no aud: any service
  const response = await fetch(resource, {
    method: "POST",
    headers: {
      authorization: `Bearer ${session.token}`,
      "content-type": "application/json",
      accept: "application/json, text/event-stream",
    },
    body: JSON.stringify({ jsonrpc: "2.0", id: 1, method: "ping" }),
  });
  assert.equal(response.status, 401);
  assert.match(response.headers.get("www-authenticate"), /not for this MCP server/);

  // The agent's fetch never sends the token to another origin.
  const sent = [];
  const capture = async (url, init) => (sent.push(new Headers(init?.headers)), new Response("{}"));
  await other.middleware()(capture)("https://elsewhere.example/mcp", { method: "POST" });
  await other.middleware()(capture)(`${origin}/mcp`, { method: "POST" });
  assert.deepEqual(
    sent.map((headers) => headers.get("authorization")),
    [null, `Bearer ${other.accessToken}`],
  );
});

test("a DPoP-bound token works; a replayed, absent or Bearer-sent proof is refused", async (t) => {
  const { privateKey } = generateKeyPairSync("ed25519");
  const token = await mcpToken("tickets.read payments.transfer", { proofKey: privateKey });
  assert.equal(token.tokenType, "DPoP");
  assert.ok(claimsOf(token.accessToken).cnf.jkt);
  const client = await connect(t, token);
  const result = await client.callTool({ name: "read_ticket", arguments: { id: "3" } });
  assert.match(text(result), /^ticket 3 read by mcp-bot/); // Check took the proof (pop_proof)

  const call = exchanges.findLast(({ init }) => init?.body?.includes?.('"tools/call"'));
  const headers = new Headers(call.init.headers);
  assert.match(headers.get("authorization"), /^DPoP /);
  const replay = await fetch(resource, { method: "POST", headers, body: call.init.body });
  assert.equal(replay.status, 401);
  assert.match(
    replay.headers.get("www-authenticate"),
    /^DPoP error="invalid_dpop_proof", error_description="the DPoP proof was used already"/,
  );

  headers.delete("dpop");
  const absent = await fetch(resource, { method: "POST", headers, body: call.init.body });
  assert.equal(absent.status, 401);
  assert.match(absent.headers.get("www-authenticate"), /a DPoP proof is required/);

  const asBearer = new Headers(headers);
  asBearer.set("authorization", `Bearer ${token.accessToken}`);
  const downgraded = await fetch(resource, { method: "POST", headers: asBearer, body: call.init.body });
  assert.equal(downgraded.status, 401);
  assert.match(downgraded.headers.get("www-authenticate"), /goes with the DPoP scheme/);

  // Step-up: only the agent can prove its key to StepUp, so the guard tells it to ask itself.
  const large = { name: "transfer", arguments: { account_id: "8", amount: 3000 } };
  const told = await client.callTool(large);
  assert.equal(told.isError, true);
  assert.match(text(told), /bound to a key: ask agentid's StepUp yourself \(action payments\.transfer/);
  const agent = new Client(target, token.accessToken, { proofKey: privateKey });
  t.after(() => agent.close());
  const stepUp = await agent.stepUp("payments.transfer", "account/8", { context: { amount: 3000 } });
  await user(t).resolveStepUp(stepUp.id, true);
  assert.equal(text(await client.callTool(large)), "3000 sent from 8");
});

test("an agent with keys signs its token exchange; a call that skipped the middleware is refused", async (t) => {
  const admin = new Client(target, adminKey);
  t.after(() => admin.close());
  const { publicKey, privateKey } = generateKeyPairSync("ec", { namedCurve: "P-256" });
  const jwk = { ...publicKey.export({ format: "jwk" }), kid: "k1", alg: "ES256", use: "sig" };
  const agentId = `mcp-keyed-${process.pid}`;
  await admin.createAgent(agentId, ["tickets.*"], { jwksJson: JSON.stringify({ keys: [jwk] }) });
  const unsigned = await rejection(mcpToken("tickets.read", { clientId: agentId }));
  assert.ok(unsigned instanceof InvalidClientError, String(unsigned));
  const wider = await rejection(
    mcpToken("payments.transfer", { clientId: agentId, clientKey: privateKey, clientKeyId: "k1" }),
  );
  assert.ok(wider instanceof InvalidScopeError, String(wider));
  const token = await mcpToken("tickets.read", {
    clientId: agentId,
    clientKey: privateKey,
    clientKeyId: "k1",
  });
  const client = await connect(t, token);
  assert.match(
    text(await client.callTool({ name: "read_ticket", arguments: { id: "5" } })),
    new RegExp(`by ${agentId} for alice`),
  );

  const bare = await connect(t, undefined, { url: `${origin}/bare` });
  const before = runs.length;
  const unchecked = await rejection(bare.callTool({ name: "read_ticket", arguments: { id: "5" } }));
  assert.equal(unchecked.code, ErrorCode.InvalidRequest);
  assert.match(unchecked.message, /not checked by agentid/);
  assert.equal(runs.length, before);
});

async function collect(iterable) {
  const items = [];
  for await (const item of iterable) items.push(item);
  return items;
}
