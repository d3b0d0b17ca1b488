package agentid_test

import (
	"context"
	"errors"
	"log/slog"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/agentid-dev/agentid/clients/go/agentid"
	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

const snapshotApplied = "agentid: revocation snapshot applied"

// startWatcher runs a watcher of target with the check key until the test ends.
func startWatcher(t *testing.T, target, key string) (*agentid.RevocationWatcher, *logRecorder) {
	t.Helper()
	logs := &logRecorder{t: t}
	w := agentid.NewRevocationWatcher(
		connect(t, target, agentid.APIKey(key)),
		agentid.WithRetryDelay(20*time.Millisecond, 200*time.Millisecond),
		agentid.WithLogger(slog.New(logs)),
	)
	go func() {
		if err := w.Run(context.Background()); err != nil {
			t.Errorf("watcher: %v", err)
		}
	}()
	t.Cleanup(func() { _ = w.Close() })
	return w, logs
}

func revoke(t *testing.T, ctx context.Context, admin *agentid.Client, session *agentidv1.DelegateResponse) uint64 {
	t.Helper()
	revoked, err := admin.RevokeSession(ctx, session.GetSessionId(), "go watcher test")
	if err != nil {
		t.Fatalf("RevokeSession: %v", err)
	}
	return revoked.GetRevocationSequence()
}

func TestWatcherFollowsRevocationsAcrossReconnects(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	admin := connect(t, srv.target, agentid.APIKey(srv.adminKey))
	sessions := []*agentidv1.DelegateResponse{delegate(t, ctx, user), delegate(t, ctx, user), delegate(t, ctx, user), delegate(t, ctx, user)}

	first := revoke(t, ctx, admin, sessions[0]) // before the watcher starts: in its snapshot
	network := startProxy(t, srv.target)
	w, logs := startWatcher(t, network.addr(), srv.checkKey)
	if err := w.WaitFor(ctx, first); err != nil {
		t.Fatalf("WaitFor(%d): %v", first, err)
	}
	if !isRevoked(t, w, sessions[0].GetSerial()) || isRevoked(t, w, sessions[1].GetSerial()) {
		t.Fatal("the snapshot does not hold exactly the revoked session")
	}

	second := revoke(t, ctx, admin, sessions[1]) // an event
	if err := w.WaitFor(ctx, second); err != nil {
		t.Fatalf("WaitFor(%d): %v", second, err)
	}
	if !isRevoked(t, w, sessions[1].GetSerial()) || isRevoked(t, w, sessions[2].GetSerial()) {
		t.Fatal("the event was not applied, or applied to the wrong session")
	}

	// The watcher loses the server; a revocation happens meanwhile; the network comes back.
	network.setDown(true)
	third := revoke(t, ctx, admin, sessions[2])
	time.Sleep(100 * time.Millisecond) // a few reconnect attempts against the closed network
	if isRevoked(t, w, sessions[2].GetSerial()) {
		t.Fatal("a revocation arrived through a cut network")
	}
	network.setDown(false)
	if err := w.WaitFor(ctx, third); err != nil {
		t.Fatalf("WaitFor(%d) after the reconnect: %v", third, err)
	}
	fourth := revoke(t, ctx, admin, sessions[3])
	if err := w.WaitFor(ctx, fourth); err != nil {
		t.Fatalf("WaitFor(%d): %v", fourth, err)
	}
	for i, session := range sessions {
		if !isRevoked(t, w, session.GetSerial()) {
			t.Errorf("session %d is not revoked locally", i)
		}
	}
	if w.Sequence() != fourth {
		t.Errorf("sequence %d, want %d", w.Sequence(), fourth)
	}
	// It resumed from its sequence: the missed revocation came as an event, not a new snapshot.
	if n := logs.count(snapshotApplied); n != 1 {
		t.Errorf("%d snapshots applied, want 1", n)
	}
}

func TestWatcherStartsOverWhenTheServerIsBehindIt(t *testing.T) {
	srv := testServer(t)
	ctx := testContext(t)
	admin := connect(t, srv.target, agentid.APIKey(srv.adminKey))
	user := connect(t, srv.target, agentid.BearerToken(srv.userToken))
	revoke(t, ctx, admin, delegate(t, ctx, user))
	ahead := revoke(t, ctx, admin, delegate(t, ctx, user)) // at least 2

	network := startProxy(t, srv.target)
	w, logs := startWatcher(t, network.addr(), srv.checkKey)
	if err := w.WaitFor(ctx, ahead); err != nil {
		t.Fatalf("WaitFor(%d): %v", ahead, err)
	}

	// Another server, whose history ends before the watcher's sequence (a database restored from
	// an older backup looks the same): resuming there is OUT_OF_RANGE; the watcher must start
	// over from that server's snapshot rather than keep asking.
	otherAdmin := connect(t, srv.otherTarget, agentid.APIKey(srv.adminKey))
	otherUser := connect(t, srv.otherTarget, agentid.BearerToken(srv.userToken))
	elsewhere := delegate(t, ctx, otherUser)
	behind := revoke(t, ctx, otherAdmin, elsewhere)
	if behind >= ahead {
		t.Fatalf("the other server is at %d, not behind %d: is it fresh?", behind, ahead)
	}
	network.switchTo(srv.otherTarget)
	eventually(t, "the watcher holds the other server's revoked set", func() bool {
		return w.Sequence() == behind && isRevoked(t, w, elsewhere.GetSerial()) && w.Revoked().GetCardinality() == 1
	})
	// The watcher logs a snapshot after it has let go of its lock, so the set can be seen a moment
	// before the line is written.
	eventually(t, "the second snapshot's log line", func() bool { return logs.count(snapshotApplied) >= 2 })
	if n := logs.count("agentid: revocation sequence ahead of the server's; starting over from a snapshot"); n != 1 {
		t.Errorf("started over %d times, want 1", n)
	}
	if n := logs.count(snapshotApplied); n != 2 {
		t.Errorf("%d snapshots applied, want 2", n)
	}
}

// isRevoked is w.IsRevoked for a watcher that must be answering.
func isRevoked(t *testing.T, w *agentid.RevocationWatcher, serial uint64) bool {
	t.Helper()
	revoked, err := w.IsRevoked(serial)
	if err != nil {
		t.Fatalf("IsRevoked(%d): %v", serial, err)
	}
	return revoked
}

func TestWatcherStops(t *testing.T) {
	srv := testServer(t)
	client := connect(t, srv.target, agentid.APIKey(srv.checkKey))
	quiet := agentid.WithLogger(slog.New(slog.DiscardHandler))

	// By its context.
	w := agentid.NewRevocationWatcher(client, quiet)
	ctx, cancel := context.WithCancel(testContext(t))
	stopped := make(chan error, 1)
	go func() { stopped <- w.Run(ctx) }()
	if err := w.WaitFor(ctx, 0); err != nil {
		t.Fatalf("WaitFor(0): %v", err)
	}
	cancel()
	select {
	case err := <-stopped:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("Run after cancel = %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after its context was cancelled")
	}
	if err := w.WaitFor(testContext(t), 1<<62); !errors.Is(err, agentid.ErrWatcherStopped) {
		t.Errorf("WaitFor on a stopped watcher = %v, want ErrWatcherStopped", err)
	}

	// By Close, which returns once Run has.
	w = agentid.NewRevocationWatcher(client, quiet)
	go func() { stopped <- w.Run(context.Background()) }()
	if err := w.WaitFor(testContext(t), 0); err != nil {
		t.Fatalf("WaitFor(0): %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-stopped:
		if err != nil {
			t.Errorf("Run after Close = %v, want nil", err)
		}
	default:
		t.Fatal("Close returned before Run did")
	}

	// Closed before it ran: it never starts, and nobody waits for it forever.
	w = agentid.NewRevocationWatcher(client, quiet)
	_ = w.Close()
	if err := w.Run(context.Background()); err == nil {
		t.Error("Run after Close started")
	}
	if err := w.WaitFor(testContext(t), 0); !errors.Is(err, agentid.ErrWatcherStopped) {
		t.Errorf("WaitFor on a closed watcher = %v, want ErrWatcherStopped", err)
	}

	// By a credential the server refuses: no retrying that, and no more answers (fail closed).
	refused := agentid.NewRevocationWatcher(connect(t, srv.target, agentid.APIKey("not-a-key-0123456789")), quiet)
	if _, err := refused.IsRevoked(1); !errors.Is(err, agentid.ErrNotSynced) {
		t.Errorf("IsRevoked before any snapshot = %v, want ErrNotSynced", err)
	}
	err := refused.Run(testContext(t))
	var e *agentid.Error
	if !errors.As(err, &e) || e.Code != codes.Unauthenticated {
		t.Errorf("Run with an unknown key = %v, want Unauthenticated", err)
	}
	if _, err := refused.IsRevoked(1); !errors.Is(err, agentid.ErrWatcherStopped) || !errors.As(err, &e) {
		t.Errorf("IsRevoked after Run returned = %v, want ErrWatcherStopped wrapping the refusal", err)
	}
}
