// The package's public names, pinned: a name added or removed here is a change to the API.
import { test } from "node:test";
import assert from "node:assert/strict";
import * as client from "../dist/index.js";

const HANDWRITTEN = [
  "AgentIdError",
  "AgentTokenVerifier",
  "Client",
  "Code",
  "ContextError",
  "EXPIRY_GRACE_SECONDS",
  "RevocationWatcher",
  "TokenRejected",
  "WatcherNotReady",
  "WatcherStopped",
  "clientAssertion",
  "grpcCodeName",
  "isLocalTarget",
  "jwkThumbprint",
  "parseJwks",
  "toContext",
];

test("the public names are the pinned ones, plus the generated messages and enums", () => {
  const names = Object.keys(client);
  const generated = names.filter((name) => name.endsWith("Schema") || name.startsWith("file_"));
  const enums = [
    "ActorKind",
    "AgentSource",
    "AgentState",
    "AuditProblem",
    "Decision",
    "EventType",
    "Reason",
    "SessionState",
    "StepUpState",
  ];
  const rest = names.filter(
    (name) => !generated.includes(name) && !enums.includes(name) && name !== "AgentIdentityService",
  );
  assert.deepEqual(rest.sort(), [...HANDWRITTEN].sort());
  for (const name of [
    ...enums,
    "AgentIdentityService",
    "CheckRequestSchema",
    "ErrorInfoSchema",
    "BadRequestSchema",
  ]) {
    assert.ok(name in client, name);
  }
  assert.equal(client.Decision.STEP_UP_REQUIRED, 3);
});

test("@agentid/client/mcp: the guard and the agent's token exchange, pinned", async () => {
  const mcp = await import("@agentid/client/mcp");
  assert.deepEqual(Object.keys(mcp).sort(), [
    "JWT_TOKEN_TYPE",
    "McpGuard",
    "McpToken",
    "TOKEN_EXCHANGE_GRANT",
    "ToolCallRefused",
    "requestMcpToken",
  ]);
});
