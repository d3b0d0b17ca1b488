/**
 * @agentid/client: delegate, check, step-up, revoke, the agent registry, a synced local
 * revocation set, and agent token verification, for Node.js.
 */

export {
  Client,
  type CallOptions,
  type CheckOptions,
  type ClientOptions,
  type CreateAgentOptions,
  type DelegateOptions,
  type RevokeTarget,
  type StepUpOptions,
  type TlsOptions,
} from "./client.js";
export { clientAssertion, type ClientAssertionOptions } from "./assertion.js";
export { ContextError, toContext } from "./context.js";
export { AgentIdError, Code, type FieldViolation, grpcCodeName } from "./errors.js";
export { isLocalTarget } from "./target.js";
export {
  type Actor,
  type AgentClaims,
  AgentTokenVerifier,
  jwkThumbprint,
  parseJwks,
  TokenRejected,
  type TokenProblem,
  type VerifierOptions,
} from "./tokens.js";
export {
  EXPIRY_GRACE_SECONDS,
  RevocationWatcher,
  WatcherNotReady,
  WatcherStopped,
  type WatcherOptions,
} from "./watcher.js";
// The generated messages and enums (Decision, Reason, StepUpState, AgentState, ...).
export * from "./gen/agentid/v1/agentid_pb.js";
export {
  type BadRequest,
  BadRequestSchema,
  type ErrorInfo,
  ErrorInfoSchema,
} from "./gen/google/rpc/error_details_pb.js";
