/**
 * A local copy of the revoked set, kept in sync by WatchRevocations.
 *
 * A service that verifies agent tokens itself (or caches decisions) runs one RevocationWatcher:
 * it starts from a snapshot (a portable Roaring bitmap of revoked `sn` serials), applies every
 * event in order, and on any disconnect resumes after the last sequence it applied, so it never
 * misses or repeats one. When its sequence cannot be continued (an event out of order, or a
 * server whose history ends before it: OUT_OF_RANGE, a database restored from a backup) it
 * starts over from a fresh snapshot, answering from the set it has until then.
 */

import roaring from "roaring";
import type { Client } from "./client.js";
import { AgentIdError, Code } from "./errors.js";
import type { RevocationEvent } from "./gen/agentid/v1/agentid_pb.js";

const { RoaringBitmap32 } = roaring;
type Bitmap = InstanceType<typeof RoaringBitmap32>;

/** Seconds a revocation is kept past its token's expiry (verifiers' clock leeways). */
export const EXPIRY_GRACE_SECONDS = 300;

/** The watcher stopped for good (stop(), or agentid refused its credential): it answers no more. */
export class WatcherStopped extends Error {
  constructor(cause: unknown) {
    super("the revocation watcher has stopped", { cause });
    this.name = "WatcherStopped";
  }
}

/** The watcher has no snapshot yet: it cannot tell a revoked session from a live one. */
export class WatcherNotReady extends Error {
  constructor() {
    super("the revocation watcher has no snapshot yet: await waitFor(0) after start()");
    this.name = "WatcherNotReady";
  }
}

export interface WatcherOptions {
  retryDelayMs?: number;
  maxRetryDelayMs?: number;
  /** Where the watcher says what happened (a reconnect, a resync, why it stopped); no tokens. */
  log?: (level: "info" | "warn" | "error", message: string) => void;
}

class Resync extends Error {}

interface Waiter {
  sequence: bigint;
  resolve: () => void;
  reject: (error: unknown) => void;
}

/**
 * Keeps the revoked serials and `sequence` in sync with the service, through a Client whose
 * credential is a service's with role check or watch. While the service cannot be reached it
 * answers from the set it has and keeps trying (backoff); the client's HTTP/2 keepalive is how
 * it learns that a quiet stream's network path has died. If the service refuses the credential
 * it stops for good, and isRevoked throws WatcherStopped from then on, as after stop(): a caller
 * is never answered from a set nobody keeps. Before the first snapshot it throws WatcherNotReady.
 */
export class RevocationWatcher {
  #revoked: Bitmap = new RoaringBitmap32();
  #sequence = 0n;
  #snapshotSeen = false;
  #failure: unknown = undefined;
  #stopped = false;
  #received = false;
  #expiring: Array<[number, number]> = []; // a min-heap of [forget at (ms), serial]
  #waiters: Waiter[] = [];
  #abort = new AbortController();
  #running: Promise<void> | undefined;
  readonly #client: Client;
  readonly #retryDelayMs: number;
  readonly #maxRetryDelayMs: number;
  readonly #log: NonNullable<WatcherOptions["log"]>;

  constructor(client: Client, options: WatcherOptions = {}) {
    this.#client = client;
    this.#retryDelayMs = options.retryDelayMs ?? 500;
    this.#maxRetryDelayMs = options.maxRetryDelayMs ?? 10_000;
    this.#log = options.log ?? (() => {});
  }

  /** The last revocation sequence applied locally. */
  get sequence(): bigint {
    return this.#sequence;
  }

  /** How many serials the local set holds. */
  get size(): number {
    return this.#revoked.size;
  }

  /** Why the watcher stopped for good, if it has. */
  get failure(): unknown {
    return this.#failure;
  }

  /** Is the session with this `sn` claim revoked? Throws WatcherNotReady before the first
   * snapshot and WatcherStopped once the watcher has stopped: refuse the token then. */
  isRevoked(serial: number | bigint): boolean {
    if (this.#stopped) throw new WatcherStopped(this.#failure);
    if (!this.#snapshotSeen) throw new WatcherNotReady();
    return this.#revoked.has(Number(BigInt(serial) % 4294967296n));
  }

  /** Starts watching in the background (until stop()). */
  start(): void {
    if (this.#running !== undefined) return;
    this.#running = this.#run();
    this.#running.catch(() => {}); // the reason is in `failure`; waiters are told
  }

  /** Stops watching and waits for the stream to close; isRevoked throws from then on. */
  async stop(): Promise<void> {
    this.#fail(new Error("stopped"));
    this.#abort.abort();
    await this.#running?.catch(() => {});
  }

  /** Resolves once a snapshot and every revocation up to `sequence` are applied locally
   * (`waitFor(0)`: the first snapshot); rejects with WatcherStopped if the watcher stops first. */
  waitFor(sequence: bigint | number, options: { signal?: AbortSignal } = {}): Promise<void> {
    if (this.#stopped) return Promise.reject(new WatcherStopped(this.#failure));
    const target = BigInt(sequence);
    if (this.#snapshotSeen && this.#sequence >= target) return Promise.resolve();
    const signal = options.signal;
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise((resolve, reject) => {
      const onAbort = () => {
        this.#waiters = this.#waiters.filter((other) => other !== waiter);
        reject(signal?.reason);
      };
      const done = () => signal?.removeEventListener("abort", onAbort);
      const waiter: Waiter = {
        sequence: target,
        resolve: () => (done(), resolve()),
        reject: (error) => (done(), reject(error)),
      };
      this.#waiters.push(waiter);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  async #run(): Promise<void> {
    let delay = this.#retryDelayMs;
    while (!this.#stopped) {
      this.#received = false;
      try {
        await this.#watchOnce();
      } catch (error) {
        if (this.#stopped) break;
        if (error instanceof AgentIdError) {
          if (error.code === Code.Unauthenticated || error.code === Code.PermissionDenied) {
            this.#log(
              "error",
              `revocation watcher stopped: agentid refused its credential (${error.codeName})`,
            );
            this.#fail(error);
            throw error;
          }
          if (error.code === Code.OutOfRange) {
            this.#log(
              "warn",
              `the service's revocations end before ${this.#sequence}; starting over from a snapshot`,
            );
            this.#sequence = 0n;
          } else {
            this.#log("info", `revocation watch ended (${error.codeName}); resuming after ${this.#sequence}`);
          }
        } else if (error instanceof Resync) {
          this.#log("error", `${error.message}; starting over from a snapshot`);
          this.#sequence = 0n;
        } else {
          this.#fail(error);
          throw error;
        }
      }
      if (this.#received) delay = this.#retryDelayMs; // a stream that delivered was a success
      await sleep(delay, this.#abort.signal);
      delay = Math.min(delay * 2, this.#maxRetryDelayMs);
    }
  }

  async #watchOnce(): Promise<void> {
    const stream = this.#client.watchRevocations(this.#sequence, { signal: this.#abort.signal });
    for await (const response of stream) {
      this.#received = true;
      const kind = response.kind;
      if (kind.case === "snapshot") {
        let bitmap: Bitmap;
        try {
          bitmap = RoaringBitmap32.deserialize(Buffer.from(kind.value.revokedSerials), "portable");
        } catch {
          throw new Resync("an unreadable revocation snapshot");
        }
        this.#revoked = bitmap;
        this.#sequence = kind.value.sequence;
        this.#snapshotSeen = true;
        this.#expiring = []; // the snapshot holds live entries only
      } else if (kind.case === "event") {
        this.#apply(kind.value);
      }
      this.#forgetExpired();
      this.#notify();
    }
  }

  #apply(event: RevocationEvent): void {
    if (event.sequence !== this.#sequence + 1n) {
      throw new Resync(`revocation event ${event.sequence} arrived after ${this.#sequence}`);
    }
    const serial = Number(event.serial % 4294967296n);
    this.#revoked.add(serial);
    this.#sequence = event.sequence;
    if (event.expiresAt !== undefined) {
      const expires = Number(event.expiresAt.seconds) * 1000 + event.expiresAt.nanos / 1e6;
      heapPush(this.#expiring, [expires + EXPIRY_GRACE_SECONDS * 1000, serial]);
    }
  }

  /** Serials whose tokens have all expired: they cannot be presented any more. */
  #forgetExpired(): void {
    const now = Date.now();
    while (this.#expiring.length > 0 && this.#expiring[0]![0] <= now) {
      const [, serial] = heapPop(this.#expiring)!;
      this.#revoked.remove(serial);
    }
  }

  #notify(): void {
    if (!this.#snapshotSeen) return;
    const ready = this.#waiters.filter((waiter) => waiter.sequence <= this.#sequence);
    this.#waiters = this.#waiters.filter((waiter) => waiter.sequence > this.#sequence);
    for (const waiter of ready) waiter.resolve();
  }

  #fail(reason: unknown): void {
    if (this.#stopped) return;
    this.#stopped = true;
    this.#failure = reason;
    const waiters = this.#waiters;
    this.#waiters = [];
    for (const waiter of waiters) waiter.reject(new WatcherStopped(reason));
  }
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(timer);
        resolve();
      },
      { once: true },
    );
  });
}

function heapPush(heap: Array<[number, number]>, item: [number, number]): void {
  heap.push(item);
  let i = heap.length - 1;
  while (i > 0) {
    const parent = (i - 1) >> 1;
    if (heap[parent]![0] <= heap[i]![0]) break;
    [heap[parent], heap[i]] = [heap[i]!, heap[parent]!];
    i = parent;
  }
}

function heapPop(heap: Array<[number, number]>): [number, number] | undefined {
  const top = heap[0];
  const last = heap.pop();
  if (heap.length > 0 && last !== undefined) {
    heap[0] = last;
    let i = 0;
    for (;;) {
      const left = 2 * i + 1;
      const right = left + 1;
      let smallest = i;
      if (left < heap.length && heap[left]![0] < heap[smallest]![0]) smallest = left;
      if (right < heap.length && heap[right]![0] < heap[smallest]![0]) smallest = right;
      if (smallest === i) break;
      [heap[smallest], heap[i]] = [heap[i]!, heap[smallest]!];
      i = smallest;
    }
  }
  return top;
}
