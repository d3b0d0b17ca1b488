/**
 * @agentid/client/mcp: agentid for MCP servers and agents built on the official TypeScript MCP
 * SDK (@modelcontextprotocol/sdk, an optional peer dependency of this package).
 */

export {
  type AgentAuth,
  type GuardMiddleware,
  type GuardRequest,
  McpGuard,
  type McpGuardOptions,
} from "./guard.js";
export { type ToolCheck, ToolCallRefused, type ToolDeclaration } from "./tools.js";
export {
  JWT_TOKEN_TYPE,
  McpToken,
  type McpTokenRequest,
  requestMcpToken,
  TOKEN_EXCHANGE_GRANT,
} from "./agent.js";
