package agentid_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/agentid-dev/agentid/clients/go/agentid"
	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

func TestDelegateThenCheck(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	service := connect(t, srv.target, agentid.APIKey(srv.checkKey))

	session := delegate(t, ctx, user)
	if got := session.GetScopes(); len(got) != 1 || got[0] != "tickets.read" {
		t.Errorf("granted scopes = %v, want [tickets.read]", got)
	}
	if session.GetUserId() != "alice" || !strings.HasPrefix(session.GetSessionId(), "ses_") {
		t.Errorf("session of %q, id %q", session.GetUserId(), session.GetSessionId())
	}

	allowed := check(t, ctx, service, &agentidv1.CheckRequest{
		Token: session.GetToken(), Action: "tickets.read", Resource: "ticket/7",
	}, agentidv1.Decision_DECISION_ALLOW, agentidv1.Reason_REASON_GRANTED)
	if allowed.GetMatchedScope() != "tickets.read" || allowed.GetSessionId() != session.GetSessionId() {
		t.Errorf("matched %q for session %q", allowed.GetMatchedScope(), allowed.GetSessionId())
	}

	// Alice holds payments.transfer; the session she delegated does not.
	check(t, ctx, service, &agentidv1.CheckRequest{
		Token: session.GetToken(), Action: "payments.transfer", Resource: "account/42",
	}, agentidv1.Decision_DECISION_DENY, agentidv1.Reason_REASON_SCOPE_NOT_GRANTED)
}

func TestErrorsCarryCodeReasonAndMetadata(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))

	_, err := user.Delegate(ctx, &agentidv1.DelegateRequest{AgentId: "support-bot", Scopes: []string{"billing.refund"}})
	var e *agentid.Error
	if !errors.As(err, &e) {
		t.Fatalf("Delegate beyond alice's scopes: %v, want an *agentid.Error", err)
	}
	if e.Code != codes.PermissionDenied || e.Reason != "SCOPE_ESCALATION" {
		t.Errorf("got %v %q, want PermissionDenied SCOPE_ESCALATION", e.Code, e.Reason)
	}
	if e.Metadata["scopes"] != "billing.refund" {
		t.Errorf("metadata = %v, want scopes=billing.refund", e.Metadata)
	}
	if status.Code(err) != codes.PermissionDenied || agentid.ReasonOf(err) != "SCOPE_ESCALATION" {
		t.Errorf("status.Code %v, ReasonOf %q", status.Code(err), agentid.ReasonOf(err))
	}
	if strings.Contains(err.Error(), srv.userToken) {
		t.Error("the error shows the caller's token")
	}

	const wrongKey = "not-a-key-of-this-service-0123456789"
	stranger := connect(t, srv.target, agentid.APIKey(wrongKey))
	_, err = stranger.Check(ctx, &agentidv1.CheckRequest{Token: "x", Action: "tickets.read"})
	if !errors.As(err, &e) || e.Code != codes.Unauthenticated || e.Reason == "" {
		t.Fatalf("Check with an unknown key: %v, want Unauthenticated with a reason", err)
	}
	if strings.Contains(err.Error(), wrongKey) {
		t.Error("the error shows the caller's key")
	}
	t.Logf("unknown key: %v", err)
}

func TestRevokeThenCheckIsDenied(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	service := connect(t, srv.target, agentid.APIKey(srv.checkKey))
	session := delegate(t, ctx, user)

	revoked, err := user.RevokeSession(ctx, session.GetSessionId(), "done")
	if err != nil {
		t.Fatalf("RevokeSession: %v", err)
	}
	if ids := revoked.GetSessionIds(); len(ids) != 1 || ids[0] != session.GetSessionId() || revoked.GetRevocationSequence() == 0 {
		t.Errorf("revoked %v at sequence %d", ids, revoked.GetRevocationSequence())
	}
	check(t, ctx, service, &agentidv1.CheckRequest{
		Token: session.GetToken(), Action: "tickets.read", Resource: "ticket/7",
		MinRevocationSequence: revoked.GetRevocationSequence(),
	}, agentidv1.Decision_DECISION_DENY, agentidv1.Reason_REASON_SESSION_REVOKED)
}

func TestJWKS(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	// Anyone may fetch the keys: the credential is irrelevant here.
	anyone := connect(t, srv.target, agentid.APIKey("irrelevant"))
	document, err := anyone.JWKS(ctx)
	if err != nil {
		t.Fatalf("JWKS: %v", err)
	}
	var jwks struct {
		Keys []map[string]any `json:"keys"`
	}
	if err := json.Unmarshal([]byte(document), &jwks); err != nil {
		t.Fatalf("JWKS is not JSON: %v", err)
	}
	if len(jwks.Keys) == 0 {
		t.Fatal("JWKS has no keys")
	}
	for _, key := range jwks.Keys {
		if key["kid"] == "" || key["kty"] == "" || key["d"] != nil {
			t.Errorf("key %v: want kid and kty, and no private part", key["kid"])
		}
	}
}

func TestCredentialStaysSecret(t *testing.T) {
	const secret = "aid_sk_do-not-print-me"
	cred := agentid.APIKey(secret)
	// Also inside what holds it: fmt does not call String on an unexported field.
	client, err := agentid.New("127.0.0.1:1", cred, agentid.Insecure())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	watcher := agentid.NewRevocationWatcher(client)
	type service struct { // a caller's own struct holding them
		client  *agentid.Client
		watcher *agentid.RevocationWatcher
		cred    agentid.Credential
	}
	for _, value := range []any{cred, client, watcher, service{client, watcher, cred}, &service{client, watcher, cred}} {
		for _, format := range []string{"%v", "%+v", "%#v", "%s", "%q", "%x"} {
			if shown := fmt.Sprintf(format, value); strings.Contains(shown, secret) || strings.Contains(shown, fmt.Sprintf("%x", secret)) {
				t.Errorf("%s of %T shows the secret: %s", format, value, shown)
			}
		}
	}
	if !cred.RequireTransportSecurity() || cred.AllowInsecure().RequireTransportSecurity() {
		t.Error("a credential needs TLS unless allowed otherwise")
	}
}

func TestCredentialIsNotSentInPlaintextUnlessAllowed(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	conn, err := grpc.NewClient(srv.target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()

	_, err = agentid.NewFromConn(conn, agentid.APIKey(srv.checkKey)).Check(ctx, &agentidv1.CheckRequest{Token: "x", Action: "a"})
	if err == nil || agentid.ReasonOf(err) != "" {
		t.Fatalf("a plaintext call with a TLS-only credential: %v, want a local refusal", err)
	}
	if _, err := agentid.NewFromConn(conn, agentid.APIKey(srv.checkKey).AllowInsecure()).JWKS(ctx); err != nil {
		t.Fatalf("allowed plaintext: %v", err)
	}
}
