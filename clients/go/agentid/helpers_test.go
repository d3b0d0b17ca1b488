package agentid_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/agentid-dev/agentid/clients/go/agentid"
	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

// server is the running agentid these tests call. tests/integration/test_go_client.py starts
// one (and a second, fresh one) and passes where they are and the credentials in the
// environment.
type server struct {
	target      string // host:port, plaintext
	otherTarget string // another server with its own, empty database
	userToken   string // an IdP token of alice: tickets.* payments.transfer agentid.delegate
	checkKey    string // API key, role check
	adminKey    string // API key, role admin
	issuer      string // the agent tokens' iss (tokens.issuer)
	jwksURL     string // the HTTP door's jwks_uri
}

func testServer(t *testing.T) server {
	t.Helper()
	get := func(name string) string {
		value := os.Getenv(name)
		if value == "" {
			t.Fatalf("%s is not set: these tests need a running agentid; "+
				"run them with tests/integration/test_go_client.py, which starts one", name)
		}
		return value
	}
	return server{
		target:      get("AGENTID_TEST_TARGET"),
		otherTarget: get("AGENTID_TEST_OTHER_TARGET"),
		userToken:   get("AGENTID_TEST_USER_TOKEN"),
		checkKey:    get("AGENTID_TEST_CHECK_KEY"),
		adminKey:    get("AGENTID_TEST_ADMIN_KEY"),
		issuer:      get("AGENTID_TEST_ISSUER"),
		jwksURL:     get("AGENTID_TEST_JWKS_URL"),
	}
}

// connect is a plaintext Client of target, closed when the test ends. Its connection retries
// quickly, so that a test that cuts connections does not wait on gRPC's default backoff.
func connect(t *testing.T, target string, cred agentid.Credential) *agentid.Client {
	t.Helper()
	fast := grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, MaxDelay: 200 * time.Millisecond},
		MinConnectTimeout: time.Second,
	})
	client, err := agentid.New(target, cred, agentid.Insecure(), agentid.WithDialOptions(fast))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

// testContext ends with the test, or after 30 seconds. (Not t.Context, which needs Go 1.24:
// the module's go directive is older.)
func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// delegate is a new support-bot session of alice that may read tickets.
func delegate(t *testing.T, ctx context.Context, user *agentid.Client) *agentidv1.DelegateResponse {
	t.Helper()
	session, err := user.Delegate(ctx, &agentidv1.DelegateRequest{
		AgentId: "support-bot",
		Scopes:  []string{"tickets.read"},
		Ttl:     durationpb.New(20 * time.Minute),
		Task:    "go client test",
	})
	if err != nil {
		t.Fatalf("Delegate: %v", err)
	}
	return session
}

// check asks service whether req may be done and fails the test on an error; the answer's
// decision and reason must be want (e.g. DECISION_ALLOW, REASON_GRANTED).
func check(t *testing.T, ctx context.Context, service *agentid.Client, req *agentidv1.CheckRequest, decision agentidv1.Decision, reason agentidv1.Reason) *agentidv1.CheckResponse {
	t.Helper()
	answer, err := service.Check(ctx, req)
	if err != nil {
		t.Fatalf("Check %s: %v", req.GetAction(), err)
	}
	if answer.GetDecision() != decision || answer.GetReason() != reason {
		t.Errorf("Check %s = %v %v, want %v %v", req.GetAction(), answer.GetDecision(), answer.GetReason(), decision, reason)
	}
	return answer
}

// proxy forwards TCP connections to an upstream it can switch, and can cut them: it stands for
// the network between a watcher and agentid.
type proxy struct {
	listener net.Listener
	mu       sync.Mutex
	upstream string
	down     bool
	conns    map[net.Conn]struct{}
}

func startProxy(t *testing.T, upstream string) *proxy {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{listener: listener, upstream: upstream, conns: map[net.Conn]struct{}{}}
	go p.serve()
	t.Cleanup(func() {
		_ = listener.Close()
		p.cut()
	})
	return p
}

func (p *proxy) addr() string { return p.listener.Addr().String() }

func (p *proxy) serve() {
	for {
		client, err := p.listener.Accept()
		if err != nil {
			return // closed
		}
		p.mu.Lock()
		upstream, down := p.upstream, p.down
		p.mu.Unlock()
		if down {
			_ = client.Close()
			continue
		}
		server, err := net.Dial("tcp", upstream)
		if err != nil {
			_ = client.Close()
			continue
		}
		p.mu.Lock()
		p.conns[client], p.conns[server] = struct{}{}, struct{}{}
		p.mu.Unlock()
		go pipe(client, server)
		go pipe(server, client)
	}
}

func pipe(to, from net.Conn) {
	_, _ = io.Copy(to, from)
	_ = to.Close()
	_ = from.Close()
}

// cut closes every open connection.
func (p *proxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for conn := range p.conns {
		_ = conn.Close()
	}
	clear(p.conns)
}

// setDown cuts every connection and refuses new ones (true), or accepts them again (false).
func (p *proxy) setDown(down bool) {
	p.mu.Lock()
	p.down = down
	p.mu.Unlock()
	if down {
		p.cut()
	}
}

// switchTo sends the next connections to another upstream and cuts the open ones.
func (p *proxy) switchTo(upstream string) {
	p.mu.Lock()
	p.upstream = upstream
	p.mu.Unlock()
	p.cut()
}

// logRecorder is a slog.Handler that keeps the messages a watcher logs, and shows them in the
// test's log.
type logRecorder struct {
	t        *testing.T
	mu       sync.Mutex
	messages []string
}

func (r *logRecorder) Enabled(context.Context, slog.Level) bool { return true }

func (r *logRecorder) Handle(_ context.Context, record slog.Record) error {
	line := record.Level.String() + " " + record.Message
	record.Attrs(func(a slog.Attr) bool {
		line += " " + a.String()
		return true
	})
	r.t.Log(line)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.messages = append(r.messages, record.Message)
	return nil
}

func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *logRecorder) WithGroup(string) slog.Handler      { return r }

func (r *logRecorder) count(message string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, m := range r.messages {
		if m == message {
			n++
		}
	}
	return n
}

// eventually fails the test unless done() holds within 10 seconds.
func eventually(t *testing.T, what string, done func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !done() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
