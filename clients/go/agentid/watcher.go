package agentid

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"sync"
	"time"

	"github.com/RoaringBitmap/roaring/v2"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

// ErrWatcherStopped is returned by WaitFor and IsRevoked once the watcher's Run has returned:
// nobody keeps its set any more, so it answers no more questions.
var ErrWatcherStopped = errors.New("agentid: revocation watcher stopped")

// ErrNotSynced is returned by IsRevoked before the first snapshot has arrived.
var ErrNotSynced = errors.New("agentid: revocation watcher has no snapshot yet")

// errResync marks a stream the watcher cannot continue from where it is: it starts over from a
// snapshot.
var errResync = errors.New("resynchronising")

// RevocationWatcher keeps a local copy of agentid's revoked set (session serials, the `sn`
// claim of agent tokens) in sync with WatchRevocations, for a service that verifies agent tokens
// itself or caches Check answers. Its Client's credential is an API key with role check or watch.
//
// Run starts from a snapshot, applies every event in sequence order and, when the stream ends,
// reconnects with backoff asking for the events after the last sequence it applied, so it
// misses and repeats none. When its sequence cannot be continued (an event out of order, or a
// server whose history ends before it: OUT_OF_RANGE) it starts over from a fresh snapshot; until
// that arrives IsRevoked keeps answering from the set it had. Once Run has returned, IsRevoked
// answers with an error: a caller is never answered from a set nobody keeps.
//
// All methods are safe for concurrent use.
type RevocationWatcher struct {
	rpc      agentidv1.AgentIdentityServiceClient
	cred     Credential
	minDelay time.Duration
	maxDelay time.Duration
	log      *slog.Logger

	closeCtx context.Context
	close    context.CancelFunc

	mu       sync.RWMutex
	revoked  *roaring.Bitmap
	sequence uint64        // the last revocation applied
	synced   bool          // a snapshot was applied since the start or the last resynchronisation
	answered bool          // a snapshot was applied at all: IsRevoked may answer
	changed  chan struct{} // closed and replaced whenever the state above changes
	started  bool
	done     chan struct{} // closed when Run returns
	err      error         // what Run returned
}

// WatcherOption configures NewRevocationWatcher.
type WatcherOption func(*RevocationWatcher)

// WithRetryDelay sets the reconnect backoff: the first delay, doubled after every failed attempt
// up to limit, with jitter (defaults 500ms and 10s). A stream that delivered anything resets it.
func WithRetryDelay(first, limit time.Duration) WatcherOption {
	return func(w *RevocationWatcher) { w.minDelay, w.maxDelay = max(first, time.Millisecond), max(first, limit) }
}

// WithLogger sets where the watcher reports reconnects and resynchronisations (default
// slog.Default()). Nothing secret is ever logged.
func WithLogger(logger *slog.Logger) WatcherOption {
	return func(w *RevocationWatcher) { w.log = logger }
}

// NewRevocationWatcher returns a watcher that watches through c; call Run to start it.
func NewRevocationWatcher(c *Client, opts ...WatcherOption) *RevocationWatcher {
	w := &RevocationWatcher{
		rpc:      c.rpc,
		cred:     c.cred,
		minDelay: 500 * time.Millisecond,
		maxDelay: 10 * time.Second,
		log:      slog.Default(),
		revoked:  roaring.New(),
		changed:  make(chan struct{}),
		done:     make(chan struct{}),
	}
	w.closeCtx, w.close = context.WithCancel(context.Background())
	for _, opt := range opts {
		opt(w)
	}
	return w
}

// IsRevoked reports whether the session with this serial (an agent token's `sn`) is revoked.
// It fails closed: ErrNotSynced before the first snapshot, and an error wrapping
// ErrWatcherStopped once Run has returned (a refused credential, Close, a cancelled context).
// While the watcher reconnects or starts over from a new snapshot it answers from the set it has.
func (w *RevocationWatcher) IsRevoked(serial uint64) (bool, error) {
	select {
	case <-w.done:
		if w.err != nil {
			return false, fmt.Errorf("%w: %w", ErrWatcherStopped, w.err)
		}
		return false, ErrWatcherStopped
	default:
	}
	w.mu.RLock()
	defer w.mu.RUnlock()
	if !w.answered {
		return false, ErrNotSynced
	}
	return w.revoked.Contains(uint32(serial)), nil // sn % 2^32
}

// Sequence is the sequence of the last revocation applied (0 until the first snapshot).
func (w *RevocationWatcher) Sequence() uint64 {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.sequence
}

// Revoked is a copy of the revoked serials.
func (w *RevocationWatcher) Revoked() *roaring.Bitmap {
	w.mu.RLock()
	defer w.mu.RUnlock()
	return w.revoked.Clone()
}

// WaitFor returns once a snapshot was applied and every revocation up to sequence too (a
// RevokeResponse's RevocationSequence); WaitFor(ctx, 0) waits for the first snapshot. It returns
// ctx's error when ctx ends first, or an error wrapping ErrWatcherStopped when Run returned.
func (w *RevocationWatcher) WaitFor(ctx context.Context, sequence uint64) error {
	for {
		w.mu.RLock()
		reached, changed := w.synced && w.sequence >= sequence, w.changed
		w.mu.RUnlock()
		if reached {
			return nil
		}
		select {
		case <-changed:
		case <-w.done:
			if w.err != nil {
				return fmt.Errorf("%w: %w", ErrWatcherStopped, w.err)
			}
			return ErrWatcherStopped
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Run watches until ctx ends (returning ctx's error), Close is called (returning nil) or the
// server refuses the credential (returning that *Error: UNAUTHENTICATED or PERMISSION_DENIED).
// Every other failure is retried. Run may be called once, and not after Close.
func (w *RevocationWatcher) Run(ctx context.Context) (result error) {
	w.mu.Lock()
	if w.started {
		w.mu.Unlock()
		return errors.New("agentid: RevocationWatcher.Run called twice, or after Close")
	}
	w.started = true
	w.mu.Unlock()
	defer func() {
		w.err = result
		close(w.done)
	}()

	watchCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(w.closeCtx, cancel)()

	delay := w.minDelay
	for {
		received, err := w.watchOnce(watchCtx)
		if watchCtx.Err() != nil {
			return ctx.Err() // nil when Close stopped it
		}
		if received {
			delay = w.minDelay
		}
		var rpcErr *Error
		switch {
		case errors.Is(err, io.EOF):
			w.log.Info("agentid: revocation watch ended by the server; resuming", "after_sequence", w.Sequence())
		case errors.Is(err, errResync):
			w.log.Warn("agentid: revocation watch out of sequence; starting over from a snapshot", "error", err)
			w.resync()
		case errors.As(err, &rpcErr) && (rpcErr.Code == codes.Unauthenticated || rpcErr.Code == codes.PermissionDenied):
			return rpcErr
		case errors.As(err, &rpcErr) && rpcErr.Code == codes.OutOfRange:
			// The server's history ends before our sequence (say, its database was restored):
			// what we hold cannot be continued.
			w.log.Warn("agentid: revocation sequence ahead of the server's; starting over from a snapshot",
				"after_sequence", w.Sequence(), "reason", rpcErr.Reason)
			w.resync()
		default:
			w.log.Info("agentid: revocation watch failed; resuming", "after_sequence", w.Sequence(), "error", err)
		}
		// Full jitter over the upper half, so that watchers cut off together do not return together.
		wait := delay/2 + rand.N(delay/2+1)
		select {
		case <-time.After(wait):
		case <-watchCtx.Done():
			return ctx.Err()
		}
		delay = min(2*delay, w.maxDelay)
	}
}

// Close stops Run and waits for it to return. It may be called more than once, and before Run
// (which then does not start).
func (w *RevocationWatcher) Close() error {
	w.close()
	w.mu.Lock()
	started := w.started
	w.started = true
	w.mu.Unlock()
	if started {
		<-w.done
	} else {
		close(w.done)
	}
	return nil
}

// watchOnce follows one WatchRevocations stream from the last applied sequence until it fails;
// received tells whether it applied anything.
func (w *RevocationWatcher) watchOnce(ctx context.Context) (received bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel() // ends the call whatever made this stream stop
	req := &agentidv1.WatchRevocationsRequest{AfterSequence: w.Sequence()}
	stream, err := w.rpc.WatchRevocations(ctx, req, grpc.PerRPCCredentials(w.cred))
	if err != nil {
		return false, wrapError(err)
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return received, io.EOF
		}
		if err != nil {
			return received, wrapError(err)
		}
		if err := w.apply(resp); err != nil {
			return received, err
		}
		received = true
	}
}

// apply applies one message of the stream: a snapshot replaces the set, an event must be the
// next in sequence.
func (w *RevocationWatcher) apply(resp *agentidv1.WatchRevocationsResponse) error {
	switch kind := resp.GetKind().(type) {
	case *agentidv1.WatchRevocationsResponse_Snapshot:
		snapshot := kind.Snapshot
		set := roaring.New()
		if err := set.UnmarshalBinary(snapshot.GetRevokedSerials()); err != nil {
			return fmt.Errorf("%w: unreadable snapshot: %w", errResync, err)
		}
		if set.GetCardinality() != snapshot.GetCount() {
			return fmt.Errorf("%w: snapshot holds %d serials, says %d", errResync, set.GetCardinality(), snapshot.GetCount())
		}
		w.mu.Lock()
		w.revoked, w.sequence, w.synced, w.answered = set, snapshot.GetSequence(), true, true
		w.notifyLocked()
		w.mu.Unlock()
		w.log.Debug("agentid: revocation snapshot applied", "sequence", snapshot.GetSequence(), "count", snapshot.GetCount())
	case *agentidv1.WatchRevocationsResponse_Event:
		event := kind.Event
		w.mu.Lock()
		defer w.mu.Unlock()
		if !w.synced || event.GetSequence() != w.sequence+1 {
			return fmt.Errorf("%w: revocation event %d arrived after %d", errResync, event.GetSequence(), w.sequence)
		}
		w.revoked.Add(uint32(event.GetSerial()))
		w.sequence = event.GetSequence()
		w.notifyLocked()
	}
	return nil
}

// resync forgets the sequence so that the next stream starts with a snapshot; the set stays.
func (w *RevocationWatcher) resync() {
	w.mu.Lock()
	w.sequence, w.synced = 0, false
	w.notifyLocked()
	w.mu.Unlock()
}

func (w *RevocationWatcher) notifyLocked() {
	close(w.changed)
	w.changed = make(chan struct{})
}
