package agentid_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/agentid-dev/agentid/clients/go/agentid"
	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

// fakeClock is a verifier's clock that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// counted counts the fetches of a KeySource.
func counted(source agentid.KeySource) (agentid.KeySource, *atomic.Int32) {
	var n atomic.Int32
	return func(ctx context.Context) (*jose.JSONWebKeySet, error) {
		n.Add(1)
		return source(ctx)
	}, &n
}

func newVerifier(t *testing.T, issuer string, keys agentid.KeySource, opts ...agentid.VerifierOption) *agentid.AgentTokenVerifier {
	t.Helper()
	v, err := agentid.NewAgentTokenVerifier(issuer, keys, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// problem is why v refuses token; the test fails unless it is a *TokenRejectedError that
// does not show the token.
func problem(t *testing.T, ctx context.Context, v *agentid.AgentTokenVerifier, token string) agentid.TokenProblem {
	t.Helper()
	claims, err := v.Verify(ctx, token)
	var rejected *agentid.TokenRejectedError
	if !errors.As(err, &rejected) || claims != nil {
		t.Fatalf("Verify = %v, %v; want no claims and a *TokenRejectedError", claims, err)
	}
	if len(token) > 20 && strings.Contains(err.Error(), token) {
		t.Errorf("the error shows the token: %v", err)
	}
	return rejected.Reason
}

// delegateFor is a new support-bot session of alice for these audiences, bound to jkt.
func delegateFor(t *testing.T, ctx context.Context, user *agentid.Client, audiences []string, jkt string) *agentidv1.DelegateResponse {
	t.Helper()
	session, err := user.Delegate(ctx, &agentidv1.DelegateRequest{
		AgentId:   "support-bot",
		Scopes:    []string{"tickets.read", "tickets.comment.add", "agentid.delegate"},
		Ttl:       durationpb.New(20 * time.Minute),
		Task:      "triage",
		Audiences: audiences,
		Jkt:       jkt,
	})
	if err != nil {
		t.Fatalf("Delegate: %v", err)
	}
	return session
}

func b64JSON(t *testing.T, value any) string {
	t.Helper()
	data, err := json.Marshal(value)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(data)
}

// split is a compact JWS's header (decoded) and its payload and signature parts.
func split(t *testing.T, token string) (map[string]any, string, string) {
	t.Helper()
	parts := strings.Split(token, ".")
	data, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil {
		t.Fatal(err)
	}
	var header map[string]any
	if err := json.Unmarshal(data, &header); err != nil {
		t.Fatal(err)
	}
	return header, parts[1], parts[2]
}

func claimsOf(t *testing.T, token string) map[string]any {
	t.Helper()
	_, payload, _ := split(t, token)
	data, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := json.Unmarshal(data, &claims); err != nil {
		t.Fatal(err)
	}
	return claims
}

// signed is payload signed with key under alg by go-jose, with this kid ("" for none) and these
// other header parameters (typ agent+jwt unless given).
func signed(t *testing.T, key any, alg jose.SignatureAlgorithm, kid string, payload []byte, extra map[jose.HeaderKey]any) string {
	t.Helper()
	options := (&jose.SignerOptions{}).WithType("agent+jwt")
	if kid != "" { // as a header: go-jose leaves a JSONWebKey's kid out for a symmetric key
		options = options.WithHeader("kid", kid)
	}
	for name, value := range extra {
		options = options.WithHeader(name, value)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, options)
	if err != nil {
		t.Fatal(err)
	}
	object, err := signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	token, err := object.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	if header, _, _ := split(t, token); kid != "" && header["kid"] != kid {
		t.Fatalf("signed: header %v, want kid %q", header, kid)
	}
	return token
}

func TestAgentTokenVerifierReadsTheClaims(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	anyone := connect(t, srv.target, agentid.APIKey("irrelevant")) // GetJwks needs no credential

	agentKey, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	jkt, err := agentid.JWKThumbprint(agentKey)
	if err != nil {
		t.Fatal(err)
	}
	session := delegateFor(t, ctx, user, []string{"payments-api"}, jkt)
	fromURL, err := agentid.KeysFromURL(srv.jwksURL, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, keys := range map[string]agentid.KeySource{"GetJwks": agentid.KeysFromClient(anyone), "jwks_uri": fromURL} {
		v := newVerifier(t, srv.issuer, keys, agentid.WithAudience("payments-api"))
		claims, err := v.Verify(ctx, session.GetToken())
		if err != nil {
			t.Fatalf("%s: Verify: %v", name, err)
		}
		want := agentid.Actor{Sub: "support-bot", Sid: session.GetSessionId()}
		if claims.Issuer != srv.issuer || claims.Subject != "alice" || claims.Act != want || claims.SessionID != session.GetSessionId() {
			t.Errorf("%s: iss %q sub %q act %+v jti %q", name, claims.Issuer, claims.Subject, claims.Act, claims.SessionID)
		}
		if claims.SN != session.GetSerial() || !slices.Equal(claims.Scopes, session.GetScopes()) {
			t.Errorf("%s: sn %d scopes %v, want %d %v", name, claims.SN, claims.Scopes, session.GetSerial(), session.GetScopes())
		}
		if !slices.Equal(claims.Audience, []string{"payments-api"}) || claims.Task != "triage" || claims.JKT != jkt || claims.Parent != "" {
			t.Errorf("%s: aud %v task %q jkt %q parent %q", name, claims.Audience, claims.Task, claims.JKT, claims.Parent)
		}
		if !claims.Expiry.Equal(session.GetExpiresAt().AsTime()) || claims.Expiry.Sub(claims.IssuedAt) != 20*time.Minute || !claims.NotBefore.Equal(claims.IssuedAt) {
			t.Errorf("%s: iat %v nbf %v exp %v, want exp %v", name, claims.IssuedAt, claims.NotBefore, claims.Expiry, session.GetExpiresAt().AsTime())
		}
		var payload map[string]any
		if err := json.Unmarshal(claims.Payload, &payload); err != nil || payload["scope"] != strings.Join(session.GetScopes(), " ") {
			t.Errorf("%s: payload %s (%v)", name, claims.Payload, err)
		}
	}

	// A sub-agent's token names its parent session, and the parent's act inside its own.
	session = delegateFor(t, ctx, user, nil, "") // unbound (no DPoP proofs), for any audience
	agent := connect(t, srv.target, agentid.BearerToken(session.GetToken()))
	child, err := agent.Delegate(ctx, &agentidv1.DelegateRequest{AgentId: "support-bot", Scopes: []string{"tickets.read"}})
	if err != nil {
		t.Fatalf("sub-agent Delegate: %v", err)
	}
	// Without an audience configured: the child has no aud (any service), as its parent.
	v := newVerifier(t, srv.issuer, agentid.KeysFromClient(anyone))
	claims, err := v.Verify(ctx, child.GetToken())
	if err != nil {
		t.Fatalf("Verify a sub-agent's token: %v", err)
	}
	if claims.Parent != session.GetSessionId() || claims.Act.Act == nil || *claims.Act.Act != (agentid.Actor{Sub: "support-bot", Sid: session.GetSessionId()}) || claims.Audience != nil {
		t.Errorf("sub-agent: parent %q act %+v aud %v", claims.Parent, claims.Act, claims.Audience)
	}
	if _, err := newVerifier(t, srv.issuer, agentid.KeysFromClient(anyone), agentid.WithAudience("crm")).Verify(ctx, child.GetToken()); err != nil {
		t.Errorf("a token without aud is for any service: %v", err)
	}
}

func TestAgentTokenVerifierRefusesWhatCheckRefuses(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	service := connect(t, srv.target, agentid.APIKey(srv.checkKey))
	session := delegateFor(t, ctx, user, []string{"payments-api"}, "")
	token := session.GetToken()
	header, payload, signature := split(t, token)
	kid := header["kid"].(string)
	claims := claimsOf(t, token)
	payloadJSON, err := base64.RawURLEncoding.DecodeString(payload)
	if err != nil {
		t.Fatal(err)
	}

	keys, fetches := counted(agentid.KeysFromClient(service))
	clock := &fakeClock{now: time.Now()}
	v := newVerifier(t, srv.issuer, keys, agentid.WithAudience("payments-api"), agentid.WithClock(clock.Now))
	if _, err := v.Verify(ctx, token); err != nil {
		t.Fatalf("the untouched token: %v", err)
	}

	_, oursPrivate, err := ed25519.GenerateKey(rand.Reader) // a key agentid never saw
	if err != nil {
		t.Fatal(err)
	}
	p256, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	server, err := service.KeySet(ctx)
	if err != nil {
		t.Fatal(err)
	}
	public := server.Key(kid)[0].Key.(ed25519.PublicKey)
	publicJWK, err := json.Marshal(server.Key(kid)[0])
	if err != nil {
		t.Fatal(err)
	}
	tampered := maps.Clone(claims)
	tampered["scope"] = "*"

	cases := []struct {
		name  string
		token string
		want  agentid.TokenProblem
	}{
		{"tampered payload", strings.Join([]string{b64JSON(t, header), b64JSON(t, tampered), signature}, "."), agentid.SignatureInvalid},
		{"alg none", b64JSON(t, map[string]any{"alg": "none", "typ": "agent+jwt", "kid": kid}) + "." + payload + ".", agentid.SignatureInvalid},
		{"HS256 keyed with the public key", signed(t, []byte(public), jose.HS256, kid, payloadJSON, nil), agentid.SignatureInvalid},
		{"HS256 keyed with the public JWK", signed(t, publicJWK, jose.HS256, kid, payloadJSON, nil), agentid.SignatureInvalid},
		{"another key under agentid's kid", signed(t, oursPrivate, jose.EdDSA, kid, payloadJSON, nil), agentid.SignatureInvalid},
		{"ES256 under an Ed25519 kid", signed(t, p256, jose.ES256, kid, payloadJSON, nil), agentid.SignatureInvalid},
		{"an unknown kid", signed(t, oursPrivate, jose.EdDSA, "made-up-kid", payloadJSON, nil), agentid.SignatureInvalid},
		{"no kid", signed(t, oursPrivate, jose.EdDSA, "", payloadJSON, nil), agentid.TokenMalformed},
		{"a crit header", signed(t, oursPrivate, jose.EdDSA, kid, payloadJSON, map[jose.HeaderKey]any{"crit": []string{"exp"}, "exp": 1}), agentid.TokenMalformed},
		{"typ JWT", signed(t, oursPrivate, jose.EdDSA, kid, payloadJSON, map[jose.HeaderKey]any{"typ": "JWT"}), agentid.TokenMalformed},
		{"three dots", token + ".", agentid.TokenMalformed},
		{"not a JWS", "not.a.token", agentid.TokenMalformed},
		{"empty", "", agentid.TokenMalformed},
		{"JSON serialization", `{"payload":"` + payload + `","protected":"` + b64JSON(t, header) + `","signature":"` + signature + `"}`, agentid.TokenMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := problem(t, ctx, v, c.token); got != c.want {
				t.Errorf("Verify: %s, want %s", got, c.want)
			}
			if c.token == "" {
				return // Check refuses an empty token as an INVALID_ARGUMENT request
			}
			// agentid's own Check says the same.
			answer, err := service.Check(ctx, &agentidv1.CheckRequest{Token: c.token, Action: "tickets.read", Resource: "ticket/7"})
			if err != nil {
				t.Fatalf("Check: %v", err)
			}
			if answer.GetDecision() != agentidv1.Decision_DECISION_DENY || answer.GetReason() != c.want.CheckReason() {
				t.Errorf("Check: %v %v, Verify: %s", answer.GetDecision(), answer.GetReason(), c.want)
			}
		})
	}
	if got := problem(t, ctx, v, strings.Repeat("a", agentid.DefaultMaxTokenBytes+1)); got != agentid.TokenMalformed {
		t.Errorf("an oversized token: %s", got)
	}
	// Made-up kids cost no fetch within the cooldown, and one after it.
	if n := fetches.Load(); n != 1 {
		t.Errorf("%d key fetches, want 1 (the first)", n)
	}
	clock.Advance(agentid.DefaultKeyRefetchCooldown)
	madeUp := signed(t, oursPrivate, jose.EdDSA, "made-up-kid", payloadJSON, nil)
	var wg sync.WaitGroup
	for range 8 { // at once: one fetches, the others wait for its keys and fetch nothing
		wg.Add(1)
		go func() {
			defer wg.Done()
			var rejected *agentid.TokenRejectedError
			if _, err := v.Verify(ctx, madeUp); !errors.As(err, &rejected) || rejected.Reason != agentid.SignatureInvalid {
				t.Errorf("an unknown kid after the cooldown: %v", err)
			}
		}()
	}
	wg.Wait()
	if n := fetches.Load(); n != 2 {
		t.Errorf("%d key fetches, want 2", n)
	}

	// Another issuer; the times, exp without leeway, nbf with; the audience.
	exp, nbf := time.Unix(int64(claims["exp"].(float64)), 0), time.Unix(int64(claims["nbf"].(float64)), 0)
	at := func(now time.Time, opts ...agentid.VerifierOption) *agentid.AgentTokenVerifier {
		opts = append([]agentid.VerifierOption{agentid.WithAudience("payments-api"), agentid.WithClock(func() time.Time { return now })}, opts...)
		return newVerifier(t, srv.issuer, keys, opts...)
	}
	for _, c := range []struct {
		name string
		v    *agentid.AgentTokenVerifier
		want agentid.TokenProblem
	}{
		{"another issuer", newVerifier(t, "https://elsewhere.example", keys, agentid.WithAudience("payments-api")), agentid.TokenMalformed},
		{"at exp", at(exp), agentid.TokenExpired},
		{"after exp", at(exp.Add(time.Second)), agentid.TokenExpired},
		{"a minute before nbf", at(nbf.Add(-time.Minute)), agentid.TokenNotYetValid},
		{"a second before nbf, no leeway", at(nbf.Add(-time.Second), agentid.WithNotBeforeLeeway(0)), agentid.TokenNotYetValid},
		{"another audience", newVerifier(t, srv.issuer, keys, agentid.WithAudience("crm")), agentid.AudienceMismatch},
		{"no audience configured", newVerifier(t, srv.issuer, keys), agentid.AudienceMismatch},
	} {
		if got := problem(t, ctx, c.v, token); got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
	}
	for _, now := range []time.Time{exp.Add(-time.Second), nbf.Add(-agentid.DefaultNotBeforeLeeway)} {
		if _, err := at(now).Verify(ctx, token); err != nil {
			t.Errorf("at %v (exp %v, nbf %v): %v", now, exp, nbf, err)
		}
	}
}

func TestAgentTokenVerifierRefusesRevokedSessions(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	service := connect(t, srv.target, agentid.APIKey(srv.checkKey))
	session := delegate(t, ctx, user)
	watcher := agentid.NewRevocationWatcher(service)
	v := newVerifier(t, srv.issuer, agentid.KeysFromClient(service), agentid.WithRevocationWatcher(watcher))

	_, err := v.Verify(ctx, session.GetToken())
	var rejected *agentid.TokenRejectedError
	if !errors.Is(err, agentid.ErrNotSynced) || errors.As(err, &rejected) {
		t.Fatalf("before the first snapshot: %v, want ErrNotSynced (not a verdict on the token)", err)
	}
	stopped := make(chan error, 1)
	go func() { stopped <- watcher.Run(ctx) }()
	if err := watcher.WaitFor(ctx, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := v.Verify(ctx, session.GetToken()); err != nil {
		t.Fatalf("a live session: %v", err)
	}
	revoked, err := user.RevokeSession(ctx, session.GetSessionId(), "go verifier test")
	if err != nil {
		t.Fatal(err)
	}
	if err := watcher.WaitFor(ctx, revoked.GetRevocationSequence()); err != nil {
		t.Fatal(err)
	}
	if got := problem(t, ctx, v, session.GetToken()); got != agentid.SessionRevoked {
		t.Errorf("a revoked session: %s", got)
	}
	if err := watcher.Close(); err != nil {
		t.Fatal(err)
	}
	<-stopped
	if _, err := v.Verify(ctx, delegate(t, ctx, user).GetToken()); !errors.Is(err, agentid.ErrWatcherStopped) {
		t.Errorf("with the watcher stopped: %v, want ErrWatcherStopped", err)
	}
}

// TestAgentTokenVerifierFollowsKeyRotation retires the signing key (the server's other tests
// delegate their own tokens, signed by the key that takes over).
func TestAgentTokenVerifierFollowsKeyRotation(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	anyone := connect(t, srv.target, agentid.APIKey("irrelevant"))
	clock := &fakeClock{now: time.Now()}
	keys, fetches := counted(agentid.KeysFromClient(anyone))
	v := newVerifier(t, srv.issuer, keys, agentid.WithClock(clock.Now))
	aged := newVerifier(t, srv.issuer, agentid.KeysFromClient(anyone), agentid.WithClock(clock.Now))

	old := delegate(t, ctx, user)
	for _, verifier := range []*agentid.AgentTokenVerifier{v, aged} {
		if _, err := verifier.Verify(ctx, old.GetToken()); err != nil {
			t.Fatalf("before the rotation: %v", err)
		}
	}
	oldKid, _, _ := split(t, old.GetToken())
	conn, err := grpc.NewClient(srv.target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	retired, err := agentidv1.NewAgentIdentityServiceClient(conn).RetireSigningKey(ctx,
		&agentidv1.RetireSigningKeyRequest{Kid: oldKid["kid"].(string), Reason: "go verifier test: rotation"},
		grpc.PerRPCCredentials(agentid.APIKey(srv.adminKey).AllowInsecure()))
	if err != nil {
		t.Fatalf("RetireSigningKey: %v", err)
	}
	fresh := delegate(t, ctx, user)
	if newKid, _, _ := split(t, fresh.GetToken()); newKid["kid"] != retired.GetSigningKid() || retired.GetSigningKid() == oldKid["kid"] {
		t.Fatalf("after retiring %v the token is signed by %v (the server says %q)", oldKid["kid"], newKid["kid"], retired.GetSigningKid())
	}

	// Within the cooldown the new kid is not fetched; after it, it is.
	if got := problem(t, ctx, v, fresh.GetToken()); got != agentid.SignatureInvalid || fetches.Load() != 1 {
		t.Errorf("within the cooldown: %s after %d fetches, want SIGNATURE_INVALID after 1", got, fetches.Load())
	}
	clock.Advance(agentid.DefaultKeyRefetchCooldown)
	if _, err := v.Verify(ctx, fresh.GetToken()); err != nil || fetches.Load() != 2 {
		t.Fatalf("a token of the new key after the cooldown: %v after %d fetches, want 2", err, fetches.Load())
	}
	// The retired key left the JWKS fetched: its tokens stop verifying.
	if got := problem(t, ctx, v, old.GetToken()); got != agentid.SignatureInvalid {
		t.Errorf("a token of the retired key: %s", got)
	}
	// A verifier that saw no new kid holds the retired key until its key set is too old.
	if _, err := aged.Verify(ctx, old.GetToken()); err != nil {
		t.Errorf("a key set younger than its max age is used: %v", err)
	}
	clock.Advance(agentid.DefaultKeyMaxAge)
	if got := problem(t, ctx, aged, old.GetToken()); got != agentid.SignatureInvalid {
		t.Errorf("a token of the retired key past the key set's max age: %s", got)
	}
}

func TestJWKThumbprint(t *testing.T) {
	for _, c := range []struct{ name, jwk, want string }{
		{ // RFC 7638 section 3.1
			"RFC 7638 RSA",
			`{"kty":"RSA","e":"AQAB","alg":"RS256","kid":"2011-04-29","n":"0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"}`,
			"NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs",
		},
		{ // RFC 8037 appendix A.3
			"RFC 8037 Ed25519",
			`{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}`,
			"kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k",
		},
	} {
		var key jose.JSONWebKey
		if err := key.UnmarshalJSON([]byte(c.jwk)); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		for _, form := range []any{key, &key, key.Key} {
			if got, err := agentid.JWKThumbprint(form); err != nil || got != c.want {
				t.Errorf("%s as %T: %q, %v; want %q", c.name, form, got, err, c.want)
			}
		}
	}
	public, private, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	fromPublic, _ := agentid.JWKThumbprint(public)
	if fromPrivate, err := agentid.JWKThumbprint(private); err != nil || fromPrivate != fromPublic {
		t.Errorf("a private key's thumbprint is its public key's: %q %v, want %q", fromPrivate, err, fromPublic)
	}
	if _, err := agentid.JWKThumbprint("not a key"); err == nil {
		t.Error("the thumbprint of a string")
	}
}

// agentid names its signing keys by their RFC 7638 thumbprints: the same computed here.
func TestKeySetAndThumbprintsOfAgentidKeys(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	anyone := connect(t, srv.target, agentid.APIKey("irrelevant"))
	set, err := anyone.KeySet(ctx)
	if err != nil {
		t.Fatalf("KeySet: %v", err)
	}
	if len(set.Keys) == 0 {
		t.Fatal("no keys")
	}
	for _, key := range set.Keys {
		thumbprint, err := agentid.JWKThumbprint(key)
		if err != nil || thumbprint != key.KeyID || !key.IsPublic() || key.Use != "sig" {
			t.Errorf("key %q: thumbprint %q (%v), public %v, use %q", key.KeyID, thumbprint, err, key.IsPublic(), key.Use)
		}
	}
}

func TestParseJWKS(t *testing.T) {
	public, private, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	document := func(key any) []byte {
		data, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key, KeyID: "k1", Algorithm: "EdDSA", Use: "sig"}}})
		if err != nil {
			t.Fatal(err)
		}
		return data
	}
	set, err := agentid.ParseJWKS(document(public))
	if err != nil || len(set.Key("k1")) != 1 {
		t.Fatalf("a set of one public key: %v, %v", set, err)
	}
	for name, bad := range map[string][]byte{
		"a private key":  document(private),
		"a secret key":   document([]byte("0123456789abcdef0123456789abcdef")),
		"no keys array":  []byte(`{"kty":"OKP"}`),
		"keys not array": []byte(`{"keys":{}}`),
		"not JSON":       []byte(`keys`),
	} {
		if _, err := agentid.ParseJWKS(bad); err == nil {
			t.Errorf("%s: parsed", name)
		} else if strings.Contains(err.Error(), base64.RawURLEncoding.EncodeToString(private.Seed())) {
			t.Errorf("%s: the error shows the private key", name)
		}
	}
}

func TestKeysFromURLNeedsHTTPSBeyondLoopback(t *testing.T) {
	for uri, ok := range map[string]bool{
		"https://agentid.example/.well-known/jwks.json": true,
		"http://127.0.0.1:8080/.well-known/jwks.json":   true,
		"http://[::1]:8080/.well-known/jwks.json":       true,
		"http://localhost:8080/.well-known/jwks.json":   true,
		"http://agentid.example/.well-known/jwks.json":  false,
		"http://10.0.0.1/.well-known/jwks.json":         false,
		"ftp://agentid.example/jwks.json":               false,
		"/.well-known/jwks.json":                        false,
	} {
		if _, err := agentid.KeysFromURL(uri, nil); (err == nil) != ok {
			t.Errorf("KeysFromURL(%q): %v", uri, err)
		}
	}
	if _, err := agentid.NewAgentTokenVerifier("", agentid.KeysFromClient(nil)); err == nil {
		t.Error("a verifier without an issuer")
	}
	if _, err := agentid.NewAgentTokenVerifier("https://agentid.example", nil); err == nil {
		t.Error("a verifier without keys")
	}
}

func TestTokenProblemsAreCheckReasons(t *testing.T) {
	for _, p := range []agentid.TokenProblem{
		agentid.TokenMalformed, agentid.SignatureInvalid, agentid.TokenExpired,
		agentid.TokenNotYetValid, agentid.AudienceMismatch, agentid.SessionRevoked,
	} {
		if reason := p.CheckReason(); reason.String() != "REASON_"+string(p) {
			t.Errorf("%s: Check's reason is %v", p, reason)
		}
	}
}
