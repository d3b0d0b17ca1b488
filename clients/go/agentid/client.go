package agentid

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"iter"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"

	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

// Client calls agentid with one credential. It is safe for concurrent use.
//
// Every method returns an *Error for a failed call (see errors.As and ReasonOf). A Check's DENY
// or STEP_UP_REQUIRED is an answer, not an error: read CheckResponse.Decision.
type Client struct {
	rpc  agentidv1.AgentIdentityServiceClient
	cred Credential
	conn *grpc.ClientConn // set when the Client made the connection and so closes it
}

// DefaultKeepalive is the HTTP/2 keepalive New sets (WithDialOptions(grpc.WithKeepaliveParams(...))
// replaces it): while a call is open the connection is pinged after 30s without traffic and
// closed when no answer comes within 10s, so a stream on a network path that died without a word
// (a RevocationWatcher's, quiet between revocations) fails and is resumed instead of waiting
// forever. agentid accepts a ping every 10s (its server.min_client_ping_interval).
var DefaultKeepalive = keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}

// Option configures New.
type Option func(*options)

type options struct {
	transport credentials.TransportCredentials
	insecure  bool
	dial      []grpc.DialOption
}

// WithTLS connects with this TLS configuration (a private CA, a client certificate for mTLS).
// Without WithTLS or Insecure, New uses TLS with the system's roots.
func WithTLS(config *tls.Config) Option {
	return func(o *options) { o.transport, o.insecure = credentials.NewTLS(config), false }
}

// Insecure connects without TLS and lets the credential travel in plaintext: for a server on
// the local machine (agentid's `make run`) or in tests only.
func Insecure() Option {
	return func(o *options) { o.transport, o.insecure = insecure.NewCredentials(), true }
}

// WithDialOptions adds gRPC dial options (interceptors, stats handlers such as OpenTelemetry's,
// keepalive, ...).
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(o *options) { o.dial = append(o.dial, opts...) }
}

// New returns a Client of the agentid server at target (a gRPC target such as
// "agentid.internal:50051" or "dns:///agentid.internal:50051") that sends cred with every call.
// It connects lazily; Close releases the connection.
func New(target string, cred Credential, opts ...Option) (*Client, error) {
	o := options{transport: credentials.NewTLS(nil)}
	for _, opt := range opts {
		opt(&o)
	}
	if o.insecure {
		cred = cred.AllowInsecure()
	}
	dial := append([]grpc.DialOption{
		grpc.WithTransportCredentials(o.transport),
		grpc.WithKeepaliveParams(DefaultKeepalive),
	}, o.dial...)
	conn, err := grpc.NewClient(target, dial...)
	if err != nil {
		return nil, fmt.Errorf("agentid: connecting to %s: %w", target, err)
	}
	c := NewFromConn(conn, cred)
	c.conn = conn
	return c, nil
}

// NewFromConn returns a Client that uses conn, which stays the caller's: Close does not close it.
// Several Clients (one per credential) may share one connection.
func NewFromConn(conn grpc.ClientConnInterface, cred Credential) *Client {
	return &Client{rpc: agentidv1.NewAgentIdentityServiceClient(conn), cred: cred}
}

// Close releases the connection New made; it does nothing for a Client of NewFromConn.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

func (c *Client) callOptions(opts []grpc.CallOption) []grpc.CallOption {
	return append([]grpc.CallOption{grpc.PerRPCCredentials(c.cred)}, opts...)
}

// Delegate hands a new agent session a token with a subset of the caller's scopes (the caller
// is a user with an IdP token, or an agent holding agentid.delegate).
func (c *Client) Delegate(ctx context.Context, req *agentidv1.DelegateRequest, opts ...grpc.CallOption) (*agentidv1.DelegateResponse, error) {
	resp, err := c.rpc.Delegate(ctx, req, c.callOptions(opts)...)
	return resp, wrapError(err)
}

// Check asks whether the agent token in req may do req.Action on req.Resource (the caller is a
// service with role check). DENY and STEP_UP_REQUIRED are answers, not errors.
func (c *Client) Check(ctx context.Context, req *agentidv1.CheckRequest, opts ...grpc.CallOption) (*agentidv1.CheckResponse, error) {
	resp, err := c.rpc.Check(ctx, req, c.callOptions(opts)...)
	return resp, wrapError(err)
}

// RevokeSession ends a session and every sub-agent session below it, immediately.
func (c *Client) RevokeSession(ctx context.Context, sessionID, reason string, opts ...grpc.CallOption) (*agentidv1.RevokeResponse, error) {
	req := &agentidv1.RevokeRequest{Target: &agentidv1.RevokeRequest_SessionId{SessionId: sessionID}, Reason: reason}
	resp, err := c.rpc.Revoke(ctx, req, c.callOptions(opts)...)
	return resp, wrapError(err)
}

// RevokeUser ends every live session the user delegated.
func (c *Client) RevokeUser(ctx context.Context, userID, reason string, opts ...grpc.CallOption) (*agentidv1.RevokeResponse, error) {
	req := &agentidv1.RevokeRequest{Target: &agentidv1.RevokeRequest_UserId{UserId: userID}, Reason: reason}
	resp, err := c.rpc.Revoke(ctx, req, c.callOptions(opts)...)
	return resp, wrapError(err)
}

// StepUp, as an agent, asks the delegating user to approve one high-risk action.
func (c *Client) StepUp(ctx context.Context, req *agentidv1.StepUpRequest, opts ...grpc.CallOption) (*agentidv1.StepUp, error) {
	resp, err := c.rpc.StepUp(ctx, req, c.callOptions(opts)...)
	return resp.GetStepUp(), wrapError(err)
}

// ResolveStepUp, as the delegating user with a fresh IdP login, approves or denies a step-up.
func (c *Client) ResolveStepUp(ctx context.Context, req *agentidv1.ResolveStepUpRequest, opts ...grpc.CallOption) (*agentidv1.StepUp, error) {
	resp, err := c.rpc.ResolveStepUp(ctx, req, c.callOptions(opts)...)
	return resp.GetStepUp(), wrapError(err)
}

// VerifyAudit recomputes the audit hash chain over a range of records (role audit or admin).
func (c *Client) VerifyAudit(ctx context.Context, req *agentidv1.VerifyAuditRequest, opts ...grpc.CallOption) (*agentidv1.VerifyAuditResponse, error) {
	resp, err := c.rpc.VerifyAudit(ctx, req, c.callOptions(opts)...)
	return resp, wrapError(err)
}

// JWKS is the JWK Set (RFC 7517, JSON) whose public keys verify agent tokens.
func (c *Client) JWKS(ctx context.Context, opts ...grpc.CallOption) (string, error) {
	resp, err := c.rpc.GetJwks(ctx, &agentidv1.GetJwksRequest{}, c.callOptions(opts)...)
	return resp.GetJwksJson(), wrapError(err)
}

// WatchStepUps yields the caller's step-ups (a user's inbox, an agent's own): their current
// state, then every change, until ctx ends, the server ends the stream or the loop breaks.
// A failure is yielded once, as the last pair.
func (c *Client) WatchStepUps(ctx context.Context, req *agentidv1.WatchStepUpsRequest, opts ...grpc.CallOption) iter.Seq2[*agentidv1.StepUp, error] {
	return func(yield func(*agentidv1.StepUp, error) bool) {
		ctx, cancel := context.WithCancel(ctx) // breaking out of the loop ends the call
		defer cancel()
		stream, err := c.rpc.WatchStepUps(ctx, req, c.callOptions(opts)...)
		for resp, err := range receive(stream, err) {
			if !yield(resp.GetStepUp(), err) {
				return
			}
		}
	}
}

// Audit yields the audit records req selects (by session or user, filters, cursor; with
// Follow, new records as they are written), as WatchStepUps yields step-ups.
func (c *Client) Audit(ctx context.Context, req *agentidv1.AuditRequest, opts ...grpc.CallOption) iter.Seq2[*agentidv1.AuditRecord, error] {
	return func(yield func(*agentidv1.AuditRecord, error) bool) {
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		stream, err := c.rpc.Audit(ctx, req, c.callOptions(opts)...)
		for resp, err := range receive(stream, err) {
			if !yield(resp.GetRecord(), err) {
				return
			}
		}
	}
}

// receive yields a server stream's messages, then its error (an *Error) if it ended with one.
func receive[T any](stream grpc.ServerStreamingClient[T], err error) iter.Seq2[*T, error] {
	return func(yield func(*T, error) bool) {
		if err != nil {
			yield(nil, wrapError(err))
			return
		}
		for {
			msg, err := stream.Recv()
			if err != nil {
				if err != io.EOF {
					yield(nil, wrapError(err))
				}
				return
			}
			if !yield(msg, nil) {
				return
			}
		}
	}
}
