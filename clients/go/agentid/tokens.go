package agentid

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"

	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

// The algorithms agentid signs agent tokens with (tokens.algorithm: EdDSA with Ed25519 by
// default, or ES256). Nothing else is accepted, whatever a token's header says: never none,
// never HS256 (which would take a public key for a shared secret).
var tokenAlgorithms = []jose.SignatureAlgorithm{jose.EdDSA, jose.ES256}

// The header typ of agent tokens: docs/api.md's agent+jwt, or RFC 9068's at+jwt (agentid's
// tokens.typ). Tokens of either typ are agentid's, as its own Check accepts both.
var tokenTypes = []string{"agent+jwt", "at+jwt"}

// Defaults of an AgentTokenVerifier.
const (
	// DefaultNotBeforeLeeway is agentid's own tokens.nbf_leeway: a token's nbf may be this far
	// ahead of the verifier's clock. exp gets no leeway, as in agentid.
	DefaultNotBeforeLeeway = 5 * time.Second
	// DefaultKeyRefetchCooldown is the shortest time between two fetches of the key set.
	DefaultKeyRefetchCooldown = 30 * time.Second
	// DefaultKeyMaxAge is how long a key set is used before the next token fetches it again
	// (a key agentid retired stops verifying here within it).
	DefaultKeyMaxAge = 5 * time.Minute
	// DefaultMaxTokenBytes is agentid's own server.max_token_bytes: a longer token is refused
	// before it is parsed.
	DefaultMaxTokenBytes = 8192
)

// TokenProblem is why an AgentTokenVerifier refused a token: the name of the Reason a Check
// gives for the same problem, without its REASON_ prefix (see CheckReason).
type TokenProblem string

// The reasons a token is refused.
const (
	TokenMalformed   TokenProblem = "TOKEN_MALFORMED"     // not an agent token of this issuer
	SignatureInvalid TokenProblem = "SIGNATURE_INVALID"   // forged, tampered, or a key it does not have
	TokenExpired     TokenProblem = "TOKEN_EXPIRED"       // at or after exp
	TokenNotYetValid TokenProblem = "TOKEN_NOT_YET_VALID" // before nbf, leeway included
	AudienceMismatch TokenProblem = "AUDIENCE_MISMATCH"   // its aud does not name this service
	SessionRevoked   TokenProblem = "SESSION_REVOKED"     // its session is revoked (the watcher says)
)

// CheckReason is the agentidv1.Reason a Check answers for this problem.
func (p TokenProblem) CheckReason() agentidv1.Reason {
	return agentidv1.Reason(agentidv1.Reason_value["REASON_"+string(p)])
}

// TokenRejectedError is a token that is not good: Reason says why. Match it with errors.As.
// Its message never shows the token.
type TokenRejectedError struct {
	Reason  TokenProblem
	Message string // one human-readable line
	Err     error  // what the JOSE library said, when it said something
}

func (e *TokenRejectedError) Error() string {
	return fmt.Sprintf("agentid: token rejected: %s: %s", e.Reason, e.Message)
}

func (e *TokenRejectedError) Unwrap() error { return e.Err }

func reject(reason TokenProblem, message string, err error) error {
	return &TokenRejectedError{Reason: reason, Message: message, Err: err}
}

// Actor is the agent acting: an agent token's `act` claim. A sub-agent's names its parent's
// inside.
type Actor struct {
	Sub string `json:"sub"`           // the agent's id, e.g. "support-bot"
	Sid string `json:"sid"`           // its session id
	Act *Actor `json:"act,omitempty"` // the delegating agent, for a sub-agent
}

// AgentClaims are an agent token's claims (docs/api.md "Agent tokens"), once verified.
type AgentClaims struct {
	Issuer    string   // iss
	Subject   string   // sub: the delegating user
	Act       Actor    // act: the agent and its session
	Audience  []string // aud: the services it may be presented to; nil when it has none (any)
	Scopes    []string // scope, split
	SessionID string   // jti
	SN        uint64   // sn: the session serial, its bit in the revocation set
	IssuedAt  time.Time
	NotBefore time.Time
	Expiry    time.Time
	Task      string // what the user delegated it for, if given
	Parent    string // the parent session id, for a sub-agent
	JKT       string // cnf.jkt: the thumbprint of the key the token is bound to; "" if unbound
	// Payload is every claim as the token carries it (JSON).
	Payload json.RawMessage
}

// AgentTokenVerifier verifies agent tokens locally, for a service that does not Check each
// one: the signature against agentid's JWKS (cached; fetched again when a token names a key it
// does not hold, at most once per cooldown, and when the set is older than its max age), the
// header (typ, algorithm, no crit), the issuer, the claims' shape, exp (no leeway) and nbf
// (with leeway), with a RevocationWatcher the session's revocation, and the audience.
//
// It is safe for concurrent use.
type AgentTokenVerifier struct {
	issuer        string
	audience      string
	watcher       *RevocationWatcher
	nbfLeeway     time.Duration
	maxTokenBytes int
	now           func() time.Time
	cooldown      time.Duration
	maxAge        time.Duration
	keys          *keyCache
}

// VerifierOption configures NewAgentTokenVerifier.
type VerifierOption func(*AgentTokenVerifier)

// WithAudience is this service's audience: a token with an `aud` claim must list it. Without
// it, every token with `aud` is refused (it was meant for particular services); tokens without
// `aud` are for any service.
func WithAudience(audience string) VerifierOption {
	return func(v *AgentTokenVerifier) { v.audience = audience }
}

// WithRevocationWatcher refuses the tokens of revoked sessions (SESSION_REVOKED). While the
// watcher cannot answer (no snapshot yet: ErrNotSynced; stopped: ErrWatcherStopped), Verify
// returns its error: refuse the token then.
func WithRevocationWatcher(w *RevocationWatcher) VerifierOption {
	return func(v *AgentTokenVerifier) { v.watcher = w }
}

// WithNotBeforeLeeway sets how far ahead of this clock a token's nbf may be (default
// DefaultNotBeforeLeeway, agentid's own).
func WithNotBeforeLeeway(leeway time.Duration) VerifierOption {
	return func(v *AgentTokenVerifier) { v.nbfLeeway = max(leeway, 0) }
}

// WithKeyRefetchCooldown sets the shortest time between two fetches of the key set (default
// DefaultKeyRefetchCooldown): tokens naming made-up kids cost at most one fetch each time.
func WithKeyRefetchCooldown(cooldown time.Duration) VerifierOption {
	return func(v *AgentTokenVerifier) { v.cooldown = max(cooldown, 0) }
}

// WithKeyMaxAge sets how long a key set is used before it is fetched again (default
// DefaultKeyMaxAge). If that fetch fails, the keys held are used until the next one works.
func WithKeyMaxAge(maxAge time.Duration) VerifierOption {
	return func(v *AgentTokenVerifier) { v.maxAge = max(maxAge, 0) }
}

// WithMaxTokenBytes sets the longest token parsed (default DefaultMaxTokenBytes; match
// agentid's server.max_token_bytes if that was raised).
func WithMaxTokenBytes(n int) VerifierOption {
	return func(v *AgentTokenVerifier) { v.maxTokenBytes = n }
}

// WithClock sets the verifier's clock (tests): token times, and the key set's age and cooldown.
func WithClock(now func() time.Time) VerifierOption {
	return func(v *AgentTokenVerifier) { v.now = now }
}

// NewAgentTokenVerifier returns a verifier of the tokens agentid issues as issuer (its
// tokens.issuer, the tokens' `iss`) with keys from keys (KeysFromClient or KeysFromURL).
func NewAgentTokenVerifier(issuer string, keys KeySource, opts ...VerifierOption) (*AgentTokenVerifier, error) {
	if issuer == "" {
		return nil, errors.New("agentid: the issuer is required")
	}
	if keys == nil {
		return nil, errors.New("agentid: a KeySource is required: KeysFromClient or KeysFromURL")
	}
	v := &AgentTokenVerifier{
		issuer:        issuer,
		nbfLeeway:     DefaultNotBeforeLeeway,
		maxTokenBytes: DefaultMaxTokenBytes,
		now:           time.Now,
		cooldown:      DefaultKeyRefetchCooldown,
		maxAge:        DefaultKeyMaxAge,
	}
	for _, opt := range opts {
		opt(v)
	}
	v.keys = &keyCache{source: keys, cooldown: v.cooldown, maxAge: v.maxAge, now: v.now}
	return v, nil
}

// Verify returns the token's claims if it is good, a *TokenRejectedError (its Reason says why)
// if it is not. Any other error means it could not be told (the keys could not be fetched, the
// watcher cannot answer): refuse the token then too.
func (v *AgentTokenVerifier) Verify(ctx context.Context, token string) (*AgentClaims, error) {
	if len(token) > v.maxTokenBytes {
		return nil, reject(TokenMalformed, fmt.Sprintf("the token is larger than %d bytes", v.maxTokenBytes), nil)
	}
	jws, err := jose.ParseSignedCompact(token, tokenAlgorithms)
	if err != nil {
		var unexpected *jose.ErrUnexpectedSignatureAlgorithm
		if errors.As(err, &unexpected) {
			return nil, reject(SignatureInvalid, "the token's algorithm is not allowed", err)
		}
		return nil, reject(TokenMalformed, "not a well-formed compact JWS", err)
	}
	header := jws.Signatures[0].Protected
	if typ, _ := header.ExtraHeaders[jose.HeaderType].(string); !slices.Contains(tokenTypes, typ) {
		return nil, reject(TokenMalformed, "not an agent token (typ)", nil)
	}
	for _, name := range []jose.HeaderKey{"crit", "b64"} {
		if _, ok := header.ExtraHeaders[name]; ok {
			return nil, reject(TokenMalformed, "critical header extensions are refused", nil)
		}
	}
	if header.KeyID == "" {
		return nil, reject(TokenMalformed, "the kid header is missing", nil)
	}
	key, err := v.keys.key(ctx, header.KeyID)
	if errors.Is(err, errNoSuchKey) {
		return nil, reject(SignatureInvalid, "unknown signing key", nil)
	} else if err != nil {
		return nil, err
	}
	if header.Algorithm != keyAlgorithm(key) { // the key fixes the algorithm, never the header
		return nil, reject(SignatureInvalid, "algorithm not allowed for this key", nil)
	}
	payload, err := jws.Verify(key)
	if err != nil {
		return nil, reject(SignatureInvalid, "bad signature", err)
	}
	claims, err := parseClaims(payload)
	if err != nil {
		return nil, reject(TokenMalformed, err.Error(), nil)
	}
	if claims.Issuer != v.issuer {
		return nil, reject(TokenMalformed, "issued by someone else", nil)
	}
	if err := v.check(claims); err != nil {
		return nil, err
	}
	return claims, nil
}

// check applies what a Check applies after the signature: times, revocation, audience.
func (v *AgentTokenVerifier) check(claims *AgentClaims) error {
	now := v.now()
	if !now.Before(claims.Expiry) {
		return reject(TokenExpired, "the token has expired", nil)
	}
	if now.Add(v.nbfLeeway).Before(claims.NotBefore) {
		return reject(TokenNotYetValid, "the token is not valid yet", nil)
	}
	if v.watcher != nil {
		revoked, err := v.watcher.IsRevoked(claims.SN)
		if err != nil {
			return fmt.Errorf("agentid: cannot tell whether session %s is revoked: %w", claims.SessionID, err)
		}
		if revoked {
			return reject(SessionRevoked, "session "+claims.SessionID+" is revoked", nil)
		}
	}
	if claims.Audience != nil && (v.audience == "" || !slices.Contains(claims.Audience, v.audience)) {
		return reject(AudienceMismatch, "the token is not meant for this audience", nil)
	}
	return nil
}

// keyAlgorithm is the one algorithm a key verifies: its alg member, else what its type implies.
func keyAlgorithm(key *jose.JSONWebKey) string {
	if key.Algorithm != "" {
		return key.Algorithm
	}
	switch k := key.Key.(type) {
	case ed25519.PublicKey:
		return string(jose.EdDSA)
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() {
			return string(jose.ES256)
		}
	}
	return ""
}

// parseClaims checks the claims' shape as agentid does (the same claims, of the same JSON
// types, exact names) and builds AgentClaims.
func parseClaims(payload []byte) (*AgentClaims, error) {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(payload, &fields); err != nil || fields == nil {
		return nil, errors.New("the payload is not a JSON object")
	}
	var missing []string
	for _, name := range []string{"iss", "sub", "act", "jti", "sn", "iat", "nbf", "exp", "scope"} {
		if _, ok := fields[name]; !ok {
			missing = append(missing, name)
		}
	}
	if missing != nil {
		return nil, fmt.Errorf("claims missing: %s", strings.Join(missing, " "))
	}
	shape := errors.New("claims do not have the agent token shape")
	claims := &AgentClaims{Payload: json.RawMessage(slices.Clone(payload))}
	var scope string
	for name, into := range map[string]*string{
		"iss": &claims.Issuer, "sub": &claims.Subject, "jti": &claims.SessionID, "scope": &scope,
	} {
		if !stringClaim(fields[name], into) {
			return nil, shape
		}
	}
	if json.Unmarshal(fields["act"], &claims.Act) != nil || claims.Act.Sub == "" || claims.Act.Sid != claims.SessionID || claims.Subject == "" {
		return nil, shape
	}
	sn, err := strconv.ParseUint(string(fields["sn"]), 10, 32)
	if err != nil {
		return nil, shape
	}
	claims.SN = sn
	for name, into := range map[string]*time.Time{"iat": &claims.IssuedAt, "nbf": &claims.NotBefore, "exp": &claims.Expiry} {
		seconds, err := strconv.ParseInt(string(fields[name]), 10, 64)
		if err != nil {
			return nil, shape
		}
		*into = time.Unix(seconds, 0)
	}
	claims.Scopes = strings.Fields(scope)
	if raw, ok := fields["aud"]; ok {
		var one string
		if stringClaim(raw, &one) {
			claims.Audience = []string{one}
		} else if json.Unmarshal(raw, &claims.Audience) != nil || claims.Audience == nil {
			return nil, errors.New("the aud claim is invalid")
		}
	}
	// Optional claims: absent or a string (client_id, RFC 9068's, names the agent as act.sub).
	var clientID string
	for name, into := range map[string]*string{"task": &claims.Task, "parent": &claims.Parent, "client_id": &clientID} {
		if raw, ok := fields[name]; ok && !stringClaim(raw, into) {
			return nil, shape
		}
	}
	if _, ok := fields["client_id"]; ok && clientID != claims.Act.Sub {
		return nil, shape
	}
	if raw, ok := fields["cnf"]; ok {
		var cnf map[string]json.RawMessage
		if json.Unmarshal(raw, &cnf) == nil && cnf != nil {
			if jkt, ok := cnf["jkt"]; ok && !stringClaim(jkt, &claims.JKT) {
				return nil, shape
			}
		}
	}
	return claims, nil
}

// stringClaim decodes a JSON string (not null, not another type) into into.
func stringClaim(raw json.RawMessage, into *string) bool {
	return len(raw) > 0 && raw[0] == '"' && json.Unmarshal(raw, into) == nil
}
