//! Counters kept by a [`Cache`](crate::Cache) and the [`Stats`] snapshot.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// A read-only snapshot of a cache's counters, from
/// [`Cache::stats`](crate::Cache::stats).
///
/// Every key asked for counts once in `loads`, and is then answered by one
/// tier: the request's own memo (`memo_hits`), another loader's fill already
/// under way in this process (`coalesced`), the process-local tier
/// (`local_hits`), the store (`store_hits`), or the provider
/// (`provider_keys` counts the keys the provider was asked for).
/// Counters only grow, except the `in_flight` gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Keys asked for through loaders (each key of a `load_many` counts, and
    /// so do duplicates).
    pub loads: u64,
    /// Loads answered by, or joined to, an earlier load of the same key in the
    /// same [`Loader`](crate::Loader) (tier 0), including primed keys.
    pub memo_hits: u64,
    /// Keys that joined a load of the same key already under way in another
    /// loader of this cache (tier 1).
    pub coalesced: u64,
    /// Keys the process-local tier answered (see
    /// [`CacheBuilder::local_tier`](crate::CacheBuilder::local_tier)).
    pub local_hits: u64,
    /// Keys the store answered with a fresh entry (tier 2), negative entries
    /// included.
    pub store_hits: u64,
    /// The part of `store_hits` that were negative entries ("not found").
    pub negative_hits: u64,
    /// The part of `store_hits` found only by the re-read after taking the
    /// keys' locks: another instance (or loader) filled them while this one
    /// waited.
    pub store_hits_after_lock: u64,
    /// Entries the store held that no longer decoded into `Value` (schema
    /// drift); each was treated as a miss and fetched again.
    pub undecodable: u64,
    /// Fills that took the store's locks.
    pub lock_waits: u64,
    /// Time spent waiting for the store's locks, over all fills.
    pub lock_wait_total: Duration,
    /// The longest single wait for the store's locks.
    pub lock_wait_max: Duration,
    /// Batches dispatched by loaders (one per batch window that had keys).
    pub batches: u64,
    /// Calls made to the provider's `fetch`.
    pub provider_calls: u64,
    /// Keys passed to the provider's `fetch`, over all calls (retries
    /// included).
    pub provider_keys: u64,
    /// Provider calls repeated after a transient error, a timeout or a
    /// rate-limit answer.
    pub provider_retries: u64,
    /// Provider calls that exceeded the provider timeout.
    pub provider_timeouts: u64,
    /// Provider calls that had to wait for the budget (the local or
    /// fleet-wide rate limit, or a fleet pause), plus waits the provider
    /// asked for with a rate-limit answer.
    pub rate_limited_waits: u64,
    /// Chunks of keys that waited for the rate limiter's budget on another
    /// chunk's call instead of a call of their own (see
    /// [`CacheBuilder::rate_limit_calls`](crate::CacheBuilder::rate_limit_calls)):
    /// provider calls saved.
    pub merged_calls: u64,
    /// `load` / `load_many` calls that returned an error.
    pub errors: u64,
    /// Keys invalidated through this cache.
    pub invalidations: u64,
    /// Expired entries served (stale-while-revalidate, or stale-if-error
    /// after a failed refill); counted in `store_hits` too.
    pub stale_served: u64,
    /// Keys renewed by background refreshes.
    pub refreshes: u64,
    /// Keys a fill found leased by another holder (another instance) and
    /// waited for, instead of fetching them.
    pub lease_waits: u64,
    /// Expired leases taken over: their holder died or hung before it
    /// published.
    pub lease_takeovers: u64,
    /// Keys whose lease was revoked (invalidated) while this cache fetched
    /// them: what was fetched was delivered to nobody, and the keys were
    /// claimed again.
    pub leases_revoked: u64,
    /// Keys being loaded right now by this cache (the in-flight table's size).
    pub in_flight: u64,
}

impl Stats {
    /// The share of loads answered without asking the provider:
    /// `(memo_hits + coalesced + local_hits + store_hits) / loads`, or 0 when nothing was
    /// loaded yet.
    ///
    /// When every distinct key is fetched once, this equals the ideal
    /// `1 - distinct / loads`.
    pub fn hit_ratio(&self) -> f64 {
        if self.loads == 0 {
            return 0.0;
        }
        (self.memo_hits + self.coalesced + self.local_hits + self.store_hits) as f64
            / self.loads as f64
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) loads: AtomicU64,
    pub(crate) memo_hits: AtomicU64,
    pub(crate) coalesced: AtomicU64,
    pub(crate) store_hits: AtomicU64,
    pub(crate) local_hits: AtomicU64,
    pub(crate) negative_hits: AtomicU64,
    pub(crate) store_hits_after_lock: AtomicU64,
    pub(crate) undecodable: AtomicU64,
    pub(crate) lock_waits: AtomicU64,
    pub(crate) lock_wait_total_us: AtomicU64,
    pub(crate) lock_wait_max_us: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) provider_calls: AtomicU64,
    pub(crate) provider_keys: AtomicU64,
    pub(crate) provider_retries: AtomicU64,
    pub(crate) provider_timeouts: AtomicU64,
    pub(crate) rate_limited_waits: AtomicU64,
    pub(crate) merged_calls: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) invalidations: AtomicU64,
    pub(crate) stale_served: AtomicU64,
    pub(crate) refreshes: AtomicU64,
    pub(crate) lease_waits: AtomicU64,
    pub(crate) lease_takeovers: AtomicU64,
    pub(crate) leases_revoked: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: usize) {
        if n > 0 {
            counter.fetch_add(n as u64, Relaxed);
        }
    }

    pub(crate) fn record_lock_wait(&self, waited: Duration) {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.lock_waits.fetch_add(1, Relaxed);
        self.lock_wait_total_us.fetch_add(micros, Relaxed);
        self.lock_wait_max_us.fetch_max(micros, Relaxed);
    }

    pub(crate) fn snapshot(&self, in_flight: usize) -> Stats {
        Stats {
            loads: self.loads.load(Relaxed),
            memo_hits: self.memo_hits.load(Relaxed),
            coalesced: self.coalesced.load(Relaxed),
            store_hits: self.store_hits.load(Relaxed),
            local_hits: self.local_hits.load(Relaxed),
            negative_hits: self.negative_hits.load(Relaxed),
            store_hits_after_lock: self.store_hits_after_lock.load(Relaxed),
            undecodable: self.undecodable.load(Relaxed),
            lock_waits: self.lock_waits.load(Relaxed),
            lock_wait_total: Duration::from_micros(self.lock_wait_total_us.load(Relaxed)),
            lock_wait_max: Duration::from_micros(self.lock_wait_max_us.load(Relaxed)),
            batches: self.batches.load(Relaxed),
            provider_calls: self.provider_calls.load(Relaxed),
            provider_keys: self.provider_keys.load(Relaxed),
            provider_retries: self.provider_retries.load(Relaxed),
            provider_timeouts: self.provider_timeouts.load(Relaxed),
            rate_limited_waits: self.rate_limited_waits.load(Relaxed),
            merged_calls: self.merged_calls.load(Relaxed),
            errors: self.errors.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            refreshes: self.refreshes.load(Relaxed),
            lease_waits: self.lease_waits.load(Relaxed),
            lease_takeovers: self.lease_takeovers.load(Relaxed),
            leases_revoked: self.leases_revoked.load(Relaxed),
            in_flight: in_flight as u64,
        }
    }
}
