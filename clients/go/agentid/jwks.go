package agentid

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"google.golang.org/grpc"
)

// MaxJWKSBytes is the largest JWK Set document KeysFromURL reads (agentid's is a few hundred
// bytes a key); a longer one is refused unread.
const MaxJWKSBytes = 1 << 20

// jwksReadTimeout bounds one read of a jwks_uri with the default HTTP client.
const jwksReadTimeout = 5 * time.Second

// ParseJWKS parses a JWK Set document (RFC 7517: GetJwks' jwks_json, or the body of the HTTP
// door's jwks_uri). It must hold public keys only; a key of a type go-jose does not know is an
// error.
func ParseJWKS(document []byte) (*jose.JSONWebKeySet, error) {
	var shape struct {
		Keys *[]json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(document, &shape); err != nil || shape.Keys == nil {
		return nil, errors.New("agentid: not a JWK Set: no keys array")
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(document, &set); err != nil {
		return nil, fmt.Errorf("agentid: not a JWK Set: %w", err)
	}
	for _, key := range set.Keys {
		if !key.IsPublic() {
			return nil, errors.New("agentid: a JWK Set of public keys was expected")
		}
	}
	return &set, nil
}

// KeySet is the JWK Set whose public keys verify agent tokens (GetJwks), parsed: JWKS returns
// the same document as JSON.
func (c *Client) KeySet(ctx context.Context, opts ...grpc.CallOption) (*jose.JSONWebKeySet, error) {
	document, err := c.JWKS(ctx, opts...)
	if err != nil {
		return nil, err
	}
	return ParseJWKS([]byte(document))
}

// JWKThumbprint is the RFC 7638 thumbprint (SHA-256, base64url) of a public key: the `jkt` a
// Delegate binds a token to (its `cnf.jkt` claim). key is a jose.JSONWebKey (or a pointer to
// one), a crypto.PublicKey (ed25519.PublicKey, *ecdsa.PublicKey, *rsa.PublicKey), or a private
// key, whose public half is used.
func JWKThumbprint(key any) (string, error) {
	var jwk jose.JSONWebKey
	switch k := key.(type) {
	case jose.JSONWebKey:
		jwk = k
	case *jose.JSONWebKey:
		if k == nil {
			return "", errors.New("agentid: no key to take the thumbprint of")
		}
		jwk = *k
	default:
		jwk = jose.JSONWebKey{Key: key}
	}
	if signer, ok := jwk.Key.(crypto.Signer); ok {
		jwk.Key = signer.Public()
	}
	digest, err := jwk.Thumbprint(crypto.SHA256)
	if err != nil {
		return "", fmt.Errorf("agentid: thumbprint: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(digest), nil
}

// KeySource fetches agentid's JWK Set for an AgentTokenVerifier: KeysFromClient or
// KeysFromURL, or a function of your own.
type KeySource func(ctx context.Context) (*jose.JSONWebKeySet, error)

// KeysFromClient fetches the keys with c's GetJwks.
func KeysFromClient(c *Client) KeySource {
	return func(ctx context.Context) (*jose.JSONWebKeySet, error) { return c.KeySet(ctx) }
}

// KeysFromURL fetches the keys from agentid's HTTP door: jwksURI is its jwks_uri (from
// /.well-known/oauth-authorization-server). It must be https, or http to a loopback host (a
// key set read in plaintext could be anyone's). httpClient nil is a client that gives up
// after 5s and follows redirects to https (or loopback http) only. A document over
// MaxJWKSBytes is refused.
func KeysFromURL(jwksURI string, httpClient *http.Client) (KeySource, error) {
	u, err := url.Parse(jwksURI)
	if err != nil {
		return nil, fmt.Errorf("agentid: jwks_uri: %w", err)
	}
	if err := secureURL(u); err != nil {
		return nil, err
	}
	if httpClient == nil {
		httpClient = &http.Client{
			Timeout: jwksReadTimeout,
			CheckRedirect: func(req *http.Request, via []*http.Request) error {
				if len(via) >= 5 {
					return errors.New("too many redirects")
				}
				return secureURL(req.URL)
			},
		}
	}
	return func(ctx context.Context) (*jose.JSONWebKeySet, error) {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			return nil, fmt.Errorf("agentid: reading %s: %w", u.Redacted(), err)
		}
		req.Header.Set("Accept", "application/json")
		resp, err := httpClient.Do(req)
		if err != nil {
			return nil, fmt.Errorf("agentid: reading the JWKS: %w", err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("agentid: reading %s: HTTP %d", u.Redacted(), resp.StatusCode)
		}
		document, err := io.ReadAll(io.LimitReader(resp.Body, MaxJWKSBytes+1))
		if err != nil {
			return nil, fmt.Errorf("agentid: reading %s: %w", u.Redacted(), err)
		}
		if len(document) > MaxJWKSBytes {
			return nil, fmt.Errorf("agentid: the JWKS at %s is over %d bytes", u.Redacted(), MaxJWKSBytes)
		}
		return ParseJWKS(document)
	}, nil
}

// secureURL refuses a URL a key set must not be read from: not https, unless http to a
// loopback host.
func secureURL(u *url.URL) error {
	switch {
	case u.Scheme == "https" && u.Host != "":
		return nil
	case u.Scheme == "http" && isLoopback(u.Hostname()):
		return nil
	default:
		return fmt.Errorf("agentid: the JWKS must be read over https (http only from a loopback host), not %s", u.Redacted())
	}
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// keyCache holds the last key set a KeySource gave. It fetches a new one when a token names a
// kid it does not hold, or when the set is older than maxAge (so a key agentid retired stops
// verifying here too), but never twice within cooldown: tokens with made-up kids do not become
// a flood of fetches.
type keyCache struct {
	source   KeySource
	cooldown time.Duration
	maxAge   time.Duration
	now      func() time.Time

	mu        sync.RWMutex // guards keys and fetchedAt
	keys      *jose.JSONWebKeySet
	fetchedAt time.Time // when keys arrived

	fetching sync.Mutex // held across a fetch (one at a time); guards triedAt and lastErr
	triedAt  time.Time  // the last fetch not cut short by its caller's context
	lastErr  error      // what that fetch failed with, if it failed
}

// errNoSuchKey: the token names a key the set does not hold, even after a fetch.
var errNoSuchKey = errors.New("no key with this kid")

// key returns the public key with this kid; errNoSuchKey when the set lacks it (or holds it
// twice); another error when no key set could be had.
func (c *keyCache) key(ctx context.Context, kid string) (*jose.JSONWebKey, error) {
	if key, ok := c.held(kid, true); ok {
		return key, nil
	}
	c.fetching.Lock()
	defer c.fetching.Unlock()
	if key, ok := c.held(kid, true); ok { // the fetch this one waited for brought it
		return key, nil
	}
	now := c.now()
	if !c.triedAt.IsZero() && now.Sub(c.triedAt) < c.cooldown {
		if key, ok := c.held(kid, false); ok { // stale, but the last fetch was just now
			return key, nil
		}
		if !c.holding() {
			return nil, fmt.Errorf("agentid: fetching the token keys (tried at most once per %s): %w", c.cooldown, c.lastErr)
		}
		return nil, errNoSuchKey
	}
	fetchCtx, cancel := context.WithTimeout(ctx, jwksReadTimeout)
	keys, err := c.source(fetchCtx)
	cancel()
	if ctx.Err() == nil { // a fetch its caller gave up on does not count
		c.triedAt, c.lastErr = now, err
	}
	if err != nil {
		// The keys held stay: agentid unreachable for a moment does not stop every token from
		// verifying. This token cannot be told good or bad: not the token's fault.
		if key, ok := c.held(kid, false); ok {
			return key, nil
		}
		return nil, fmt.Errorf("agentid: fetching the token keys: %w", err)
	}
	c.mu.Lock()
	c.keys, c.fetchedAt = keys, now
	c.mu.Unlock()
	if key, ok := c.held(kid, false); ok {
		return key, nil
	}
	return nil, errNoSuchKey
}

func (c *keyCache) holding() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.keys != nil
}

// held is the one key of the set held with this kid; with fresh, only while the set is younger
// than maxAge.
func (c *keyCache) held(kid string, fresh bool) (*jose.JSONWebKey, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.keys == nil || (fresh && c.now().Sub(c.fetchedAt) >= c.maxAge) {
		return nil, false
	}
	keys := c.keys.Key(kid)
	if len(keys) != 1 {
		return nil, false
	}
	return &keys[0], true
}
