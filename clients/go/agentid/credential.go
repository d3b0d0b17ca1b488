package agentid

import (
	"context"
	"errors"

	"google.golang.org/grpc/credentials"
)

// Credential is the bearer credential a Client sends with every call, as gRPC metadata
// "authorization: Bearer <credential>": a service API key, a user's IdP token or an agent token.
//
// It implements credentials.PerRPCCredentials. By default gRPC sends it only over a secure
// (TLS) connection; see AllowInsecure. It never prints its secret: fmt shows a placeholder.
type Credential struct {
	// The secret is held by a closure: fmt shows a func as an address, whatever the verb and
	// however deep it sits in the value printed (a field of a caller's own struct, say).
	secret        func() string
	allowInsecure bool
}

func hold(value string) func() string { return func() string { return value } }

var _ credentials.PerRPCCredentials = Credential{}

// APIKey is a service's API key (a `[[services]]` entry of the agentid config).
func APIKey(key string) Credential { return Credential{secret: hold(key)} }

// BearerToken is a token: a user's IdP token (to delegate, revoke or approve step-ups) or an
// agent token issued by agentid (to sub-delegate, ask for step-ups or end its own session).
func BearerToken(token string) Credential { return Credential{secret: hold(token)} }

// AllowInsecure returns a copy of c that gRPC may also send over a plaintext connection: for a
// server on the local machine or in tests. Anyone on the path can read the credential then.
func (c Credential) AllowInsecure() Credential {
	c.allowInsecure = true
	return c
}

// GetRequestMetadata implements credentials.PerRPCCredentials.
func (c Credential) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	if c.secret == nil {
		return nil, errors.New("agentid: empty Credential: use APIKey or BearerToken")
	}
	return map[string]string{"authorization": "Bearer " + c.secret()}, nil
}

// RequireTransportSecurity implements credentials.PerRPCCredentials.
func (c Credential) RequireTransportSecurity() bool { return !c.allowInsecure }

// String hides the secret.
func (c Credential) String() string { return "agentid.Credential(redacted)" }

// GoString hides the secret from %#v too.
func (c Credential) GoString() string { return c.String() }
