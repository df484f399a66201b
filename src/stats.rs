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
    /// Keys this cache's provider calls fetched for fills of other
    /// instances (or other fills of this one) that joined them before
    /// their turn of a fleet budget (see
    /// [`BatchFetch::parse_key`](crate::BatchFetch::parse_key)): turns of
    /// the budget those fills did not take.
    pub carried_keys: u64,
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

/// One counter of a cache: its value for [`Stats`], and with the `metrics`
/// feature the same increments to the [`metrics`] facade.
#[derive(Debug)]
pub(crate) struct Counter {
    value: AtomicU64,
    #[cfg(feature = "metrics")]
    metric: metrics::Counter,
}

impl Default for Counter {
    fn default() -> Self {
        Counter {
            value: AtomicU64::new(0),
            #[cfg(feature = "metrics")]
            metric: metrics::Counter::noop(),
        }
    }
}

impl Counter {
    pub(crate) fn load(&self, order: std::sync::atomic::Ordering) -> u64 {
        self.value.load(order)
    }

    fn add(&self, n: u64) {
        self.value.fetch_add(n, Relaxed);
        #[cfg(feature = "metrics")]
        self.metric.increment(n);
    }
}

/// The durations the `metrics` feature reports as histograms.
#[cfg(feature = "metrics")]
#[derive(Debug)]
struct Histograms {
    fill: metrics::Histogram,
    lock_wait: metrics::Histogram,
    provider_call: metrics::Histogram,
}

#[cfg(feature = "metrics")]
impl Default for Histograms {
    fn default() -> Self {
        Histograms {
            fill: metrics::Histogram::noop(),
            lock_wait: metrics::Histogram::noop(),
            provider_call: metrics::Histogram::noop(),
        }
    }
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) loads: Counter,
    pub(crate) memo_hits: Counter,
    pub(crate) coalesced: Counter,
    pub(crate) store_hits: Counter,
    pub(crate) local_hits: Counter,
    pub(crate) negative_hits: Counter,
    pub(crate) store_hits_after_lock: Counter,
    pub(crate) undecodable: Counter,
    pub(crate) lock_waits: Counter,
    pub(crate) lock_wait_total_us: AtomicU64,
    pub(crate) lock_wait_max_us: AtomicU64,
    pub(crate) batches: Counter,
    pub(crate) provider_calls: Counter,
    pub(crate) provider_keys: Counter,
    pub(crate) provider_retries: Counter,
    pub(crate) provider_timeouts: Counter,
    pub(crate) rate_limited_waits: Counter,
    pub(crate) merged_calls: Counter,
    pub(crate) carried_keys: Counter,
    pub(crate) errors: Counter,
    pub(crate) invalidations: Counter,
    pub(crate) stale_served: Counter,
    pub(crate) refreshes: Counter,
    pub(crate) lease_waits: Counter,
    pub(crate) lease_takeovers: Counter,
    pub(crate) leases_revoked: Counter,
    #[cfg(feature = "metrics")]
    histograms: Histograms,
}

impl Counters {
    /// The counters of a cache of `namespace`; with the `metrics` feature,
    /// registered with the recorder installed now, labelled by namespace.
    pub(crate) fn new(namespace: &str) -> Self {
        #[cfg(not(feature = "metrics"))]
        let _ = namespace;
        #[allow(unused_mut)]
        let mut counters = Counters::default();
        #[cfg(feature = "metrics")]
        counters.register(namespace);
        counters
    }

    #[cfg(feature = "metrics")]
    fn register(&mut self, namespace: &str) {
        describe();
        let ns = namespace.to_owned();
        let counters = self;
        counters.loads.metric =
            metrics::counter!("loadlock_loads_total", "namespace" => ns.clone());
        counters.memo_hits.metric =
            metrics::counter!("loadlock_hits_total", "namespace" => ns.clone(), "tier" => "memo");
        counters.coalesced.metric = metrics::counter!("loadlock_hits_total", "namespace" => ns.clone(), "tier" => "coalesced");
        counters.store_hits.metric =
            metrics::counter!("loadlock_hits_total", "namespace" => ns.clone(), "tier" => "store");
        counters.local_hits.metric =
            metrics::counter!("loadlock_hits_total", "namespace" => ns.clone(), "tier" => "local");
        counters.negative_hits.metric =
            metrics::counter!("loadlock_negative_hits_total", "namespace" => ns.clone());
        counters.store_hits_after_lock.metric =
            metrics::counter!("loadlock_hits_after_lock_total", "namespace" => ns.clone());
        counters.undecodable.metric =
            metrics::counter!("loadlock_undecodable_total", "namespace" => ns.clone());
        counters.lock_waits.metric =
            metrics::counter!("loadlock_lock_waits_total", "namespace" => ns.clone());
        counters.batches.metric =
            metrics::counter!("loadlock_batches_total", "namespace" => ns.clone());
        counters.provider_calls.metric =
            metrics::counter!("loadlock_provider_calls_total", "namespace" => ns.clone());
        counters.provider_keys.metric =
            metrics::counter!("loadlock_provider_keys_total", "namespace" => ns.clone());
        counters.provider_retries.metric =
            metrics::counter!("loadlock_provider_retries_total", "namespace" => ns.clone());
        counters.provider_timeouts.metric =
            metrics::counter!("loadlock_provider_timeouts_total", "namespace" => ns.clone());
        counters.rate_limited_waits.metric =
            metrics::counter!("loadlock_rate_limited_waits_total", "namespace" => ns.clone());
        counters.merged_calls.metric =
            metrics::counter!("loadlock_merged_calls_total", "namespace" => ns.clone());
        counters.carried_keys.metric =
            metrics::counter!("loadlock_carried_keys_total", "namespace" => ns.clone());
        counters.errors.metric =
            metrics::counter!("loadlock_errors_total", "namespace" => ns.clone());
        counters.invalidations.metric =
            metrics::counter!("loadlock_invalidations_total", "namespace" => ns.clone());
        counters.stale_served.metric =
            metrics::counter!("loadlock_stale_served_total", "namespace" => ns.clone());
        counters.refreshes.metric =
            metrics::counter!("loadlock_refreshes_total", "namespace" => ns.clone());
        counters.lease_waits.metric =
            metrics::counter!("loadlock_lease_waits_total", "namespace" => ns.clone());
        counters.lease_takeovers.metric =
            metrics::counter!("loadlock_lease_takeovers_total", "namespace" => ns.clone());
        counters.leases_revoked.metric =
            metrics::counter!("loadlock_leases_revoked_total", "namespace" => ns.clone());
        counters.histograms = Histograms {
            fill: metrics::histogram!("loadlock_fill_duration_seconds", "namespace" => ns.clone()),
            lock_wait: metrics::histogram!("loadlock_lock_wait_seconds", "namespace" => ns.clone()),
            provider_call: metrics::histogram!("loadlock_provider_call_duration_seconds", "namespace" => ns),
        };
    }

    pub(crate) fn add(counter: &Counter, n: usize) {
        if n > 0 {
            counter.add(n as u64);
        }
    }

    pub(crate) fn record_lock_wait(&self, waited: Duration) {
        let micros = u64::try_from(waited.as_micros()).unwrap_or(u64::MAX);
        self.lock_waits.add(1);
        self.lock_wait_total_us.fetch_add(micros, Relaxed);
        self.lock_wait_max_us.fetch_max(micros, Relaxed);
        #[cfg(feature = "metrics")]
        self.histograms.lock_wait.record(waited.as_secs_f64());
    }

    /// How long a store took to fill a batch's misses.
    pub(crate) fn record_fill(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        self.histograms.fill.record(took.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = took;
    }

    /// How long one provider call took (until its answer or failure).
    pub(crate) fn record_provider_call(&self, took: Duration) {
        #[cfg(feature = "metrics")]
        self.histograms.provider_call.record(took.as_secs_f64());
        #[cfg(not(feature = "metrics"))]
        let _ = took;
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
            carried_keys: self.carried_keys.load(Relaxed),
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

/// What each metric means, for the recorder (Prometheus' `HELP`).
#[cfg(feature = "metrics")]
fn describe() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_counter!(
        "loadlock_loads_total",
        "Keys asked for through loaders (each key of a load_many, duplicates too)."
    );
    describe_counter!(
        "loadlock_hits_total",
        "Loads answered without the provider, by tier: memo, coalesced, local, store."
    );
    describe_counter!(
        "loadlock_negative_hits_total",
        "Store hits that were negative entries (not found)."
    );
    describe_counter!(
        "loadlock_hits_after_lock_total",
        "Keys another instance filled while this fill waited for their locks."
    );
    describe_counter!(
        "loadlock_undecodable_total",
        "Stored rows that did not decode into the value type (refetched)."
    );
    describe_counter!(
        "loadlock_lock_waits_total",
        "Claims and locks taken by fills."
    );
    describe_counter!("loadlock_batches_total", "Batches dispatched by loaders.");
    describe_counter!(
        "loadlock_provider_calls_total",
        "Provider calls made (each attempt counts)."
    );
    describe_counter!(
        "loadlock_provider_keys_total",
        "Keys sent to the provider (each attempt counts)."
    );
    describe_counter!(
        "loadlock_provider_retries_total",
        "Provider calls repeated after a transient error, a timeout or a rate-limited answer."
    );
    describe_counter!(
        "loadlock_provider_timeouts_total",
        "Provider calls that exceeded the provider timeout."
    );
    describe_counter!(
        "loadlock_rate_limited_waits_total",
        "Provider calls that waited for the budget, and rate-limited answers waited out."
    );
    describe_counter!(
        "loadlock_merged_calls_total",
        "Chunks that rode on another chunk's call while waiting for the budget (calls saved)."
    );
    describe_counter!(
        "loadlock_carried_keys_total",
        "Keys fetched for other instances' fills that joined a call before its turn."
    );
    describe_counter!(
        "loadlock_errors_total",
        "load and load_many calls that returned an error."
    );
    describe_counter!(
        "loadlock_invalidations_total",
        "Keys invalidated through this cache."
    );
    describe_counter!(
        "loadlock_stale_served_total",
        "Expired entries served (stale-while-revalidate, stale-if-error)."
    );
    describe_counter!(
        "loadlock_refreshes_total",
        "Keys refreshed in the background."
    );
    describe_counter!(
        "loadlock_lease_waits_total",
        "Keys a fill found leased by another holder and waited for."
    );
    describe_counter!(
        "loadlock_lease_takeovers_total",
        "Leases taken over after their holder's lease expired."
    );
    describe_counter!(
        "loadlock_leases_revoked_total",
        "Keys whose lease was revoked while they were fetched (claimed again)."
    );
    describe_histogram!(
        "loadlock_fill_duration_seconds",
        Unit::Seconds,
        "How long a store took to fill a batch's misses, provider call included."
    );
    describe_histogram!(
        "loadlock_lock_wait_seconds",
        Unit::Seconds,
        "How long a fill's claim or lock statement took, waits for other holders' locks included."
    );
    describe_histogram!(
        "loadlock_provider_call_duration_seconds",
        Unit::Seconds,
        "How long one provider call took, until its answer, failure or timeout."
    );
}
