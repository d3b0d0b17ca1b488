// Package agentid is a client of agentid, the identity and authorization service for AI agent
// sessions: users delegate short-lived, narrowed tokens to agent sessions, services Check every
// agent action, and revocations reach every service at once.
//
// A service that checks agent actions:
//
//	client, err := agentid.New("agentid.internal:50051", agentid.APIKey(os.Getenv("AGENTID_API_KEY")))
//	if err != nil { ... }
//	defer client.Close()
//	answer, err := client.Check(ctx, &agentidv1.CheckRequest{
//		Token: agentToken, Action: "tickets.read", Resource: "ticket/7",
//	})
//	if err != nil { ... } // an *Error: gRPC code, ErrorInfo reason and metadata
//	if answer.GetDecision() != agentidv1.Decision_DECISION_ALLOW { ... } // answer.GetReason() says why
//
// A service that verifies agent tokens itself keeps the revoked set with a RevocationWatcher:
//
//	watcher := agentid.NewRevocationWatcher(client)
//	go watcher.Run(ctx)
//	defer watcher.Close()
//	if err := watcher.WaitFor(ctx, 0); err != nil { ... } // the first snapshot
//	verifier, err := agentid.NewAgentTokenVerifier(issuer, agentid.KeysFromClient(client),
//		agentid.WithAudience("payments-api"), agentid.WithRevocationWatcher(watcher))
//	if err != nil { ... }
//	claims, err := verifier.Verify(ctx, agentToken)
//	var rejected *agentid.TokenRejectedError
//	if errors.As(err, &rejected) { ... } // rejected.Reason: TOKEN_EXPIRED, SESSION_REVOKED, ...
//	if err != nil { ... } // the keys or the watcher could not answer: refuse the token too
//	// claims.Subject (the user), claims.Act.Sub (the agent), claims.Scopes, claims.SN, ...
//
// The signature is checked against agentid's JWK Set (Client.KeySet, or the HTTP door's
// jwks_uri: KeysFromURL), which the verifier caches; JWKThumbprint computes the RFC 7638
// thumbprint an agent's key is bound by (DelegateRequest.Jkt).
//
// Generated messages and the raw gRPC stub are in package agentidv1.
package agentid
