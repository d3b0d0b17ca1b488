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
//	revoked, err := watcher.IsRevoked(claims.SN)
//	if err != nil || revoked { ... } // refuse: fail closed when the watcher has stopped
//
// Generated messages and the raw gRPC stub are in package agentidv1.
package agentid
