package agentid

import (
	"testing"

	"github.com/RoaringBitmap/roaring/v2"

	agentidv1 "github.com/agentid-dev/agentid/clients/go/agentidv1"
)

func snapshotOf(t *testing.T, sequence uint64, serials ...uint32) *agentidv1.WatchRevocationsResponse {
	t.Helper()
	set := roaring.BitmapOf(serials...)
	raw, err := set.ToBytes()
	if err != nil {
		t.Fatal(err)
	}
	return &agentidv1.WatchRevocationsResponse{Kind: &agentidv1.WatchRevocationsResponse_Snapshot{
		Snapshot: &agentidv1.RevocationSnapshot{Sequence: sequence, RevokedSerials: raw, Count: set.GetCardinality()},
	}}
}

func eventOf(sequence, serial uint64) *agentidv1.WatchRevocationsResponse {
	return &agentidv1.WatchRevocationsResponse{Kind: &agentidv1.WatchRevocationsResponse_Event{
		Event: &agentidv1.RevocationEvent{Sequence: sequence, Serial: serial},
	}}
}

// The server sends a fresh snapshot mid-stream in place of a burst larger than its buffer for
// one watcher (a mass revocation): the watcher replaces its set and goes on from its sequence.
func TestASnapshotMidStreamReplacesTheSet(t *testing.T) {
	w := NewRevocationWatcher(&Client{})
	for _, msg := range []*agentidv1.WatchRevocationsResponse{
		snapshotOf(t, 2, 1, 2),
		eventOf(3, 3),
		snapshotOf(t, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9), // events 4-9 arrived as this
		eventOf(10, 10),
	} {
		if err := w.apply(msg); err != nil {
			t.Fatalf("apply: %v", err)
		}
	}
	if got := w.Sequence(); got != 10 {
		t.Fatalf("sequence %d, want 10", got)
	}
	if got := w.Revoked().ToArray(); len(got) != 10 || got[0] != 1 || got[9] != 10 {
		t.Fatalf("revoked %v, want 1..10", got)
	}
	if err := w.apply(eventOf(12, 12)); err == nil {
		t.Fatal("an event after a gap was applied")
	}
}
