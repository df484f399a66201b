//! [`CacheBuilder`]: the settings of a cache, checked when it is built.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::caller::{CallPolicy, ProviderCaller};
use crate::config::{
    DEFAULT_BATCH_WINDOW, DEFAULT_NEGATIVE_TTL, DEFAULT_PROVIDER_TIMEOUT, DEFAULT_TTL,
    MAX_NAMESPACE_LEN, MAX_TTL,
};
use crate::inflight::InFlight;
use crate::limit::{FleetLimiter, Limiter};
use crate::local::LocalTier;
use crate::pipeline::CacheInner;
use crate::stats::Counters;
use crate::{BatchFetch, Cache, CacheConfig, Error, MemoryStore, Quota, RetryPolicy, Store};

impl<F: BatchFetch> Cache<F> {
    /// Starts building a cache in front of `provider`.
    pub fn builder(provider: F) -> CacheBuilder<F> {
        CacheBuilder {
            provider,
            store: None,
            ttl: DEFAULT_TTL,
            negative_ttl: DEFAULT_NEGATIVE_TTL,
            batch_window: DEFAULT_BATCH_WINDOW,
            wait_full_window: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            provider_timeout: DEFAULT_PROVIDER_TIMEOUT,
            chunk_concurrency: 1,
            retry: RetryPolicy::default(),
            calls_quota: None,
            keys_quota: None,
            fleet: None,
            local_tier: None,
        }
    }
}

/// Builds a [`Cache`]; from [`Cache::builder`].
///
/// | setting | default |
/// |---|---|
/// | [`store`](CacheBuilder::store) | a new [`MemoryStore`] (this process only) |
/// | [`ttl`](CacheBuilder::ttl) | [`DEFAULT_TTL`], 5 min |
/// | [`negative_ttl`](CacheBuilder::negative_ttl) | [`DEFAULT_NEGATIVE_TTL`], 1 min |
/// | [`batch_window`](CacheBuilder::batch_window) | [`DEFAULT_BATCH_WINDOW`], 500 µs |
/// | [`wait_full_window`](CacheBuilder::wait_full_window) | `false` (a window of one task's loads ends when they stop coming) |
/// | [`provider_timeout`](CacheBuilder::provider_timeout) | [`DEFAULT_PROVIDER_TIMEOUT`], 10 s |
/// | [`chunk_concurrency`](CacheBuilder::chunk_concurrency) | 1 |
/// | [`retry`](CacheBuilder::retry) | [`RetryPolicy::default`] |
/// | [`rate_limit_calls`](CacheBuilder::rate_limit_calls), [`rate_limit_keys`](CacheBuilder::rate_limit_keys) | none |
#[must_use = "a builder does nothing until .build() is called"]
pub struct CacheBuilder<F: BatchFetch> {
    provider: F,
    store: Option<Arc<dyn Store<F>>>,
    ttl: Duration,
    negative_ttl: Duration,
    batch_window: Duration,
    wait_full_window: bool,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
    provider_timeout: Duration,
    chunk_concurrency: usize,
    retry: RetryPolicy,
    calls_quota: Option<Quota>,
    keys_quota: Option<Quota>,
    fleet: Option<Arc<dyn FleetLimiter>>,
    local_tier: Option<(u64, Duration)>,
}

impl<F: BatchFetch> fmt::Debug for CacheBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.provider.namespace())
            .field("custom_store", &self.store.is_some())
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("batch_window", &self.batch_window)
            .field("wait_full_window", &self.wait_full_window)
            .field("provider_timeout", &self.provider_timeout)
            .field("chunk_concurrency", &self.chunk_concurrency)
            .field("retry", &self.retry)
            .field("calls_quota", &self.calls_quota)
            .field("keys_quota", &self.keys_quota)
            .field("fleet_rate_limit", &self.fleet)
            .finish_non_exhaustive()
    }
}

impl<F: BatchFetch> CacheBuilder<F> {
    /// Where entries are kept between requests. Pass a shared store to share
    /// one cache between instances; clones of a [`MemoryStore`] share it
    /// between caches of one process.
    pub fn store(mut self, store: impl Store<F>) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// How long a fetched value stays fresh. Must be non-zero; capped at
    /// [`MAX_TTL`].
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.min(MAX_TTL);
        self
    }

    /// How long a negative entry (the provider has no such key) stays fresh.
    /// Must be non-zero; capped at [`MAX_TTL`].
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = negative_ttl.min(MAX_TTL);
        self
    }

    /// The longest a loader collects keys before dispatching them as one
    /// batch, counted from the first key of the batch.
    ///
    /// A window does not always wait out its length: it dispatches as soon
    /// as a full provider call (`max_batch_size` keys) is in, and, when all
    /// its keys came from the one task that started it through a loader
    /// with no other handle (a `join_all`, `load_many`, resolvers sharing
    /// `&loader`), once that task stopped issuing loads and no key arrived
    /// for 200 µs more. The keys of a loader cloned for other tasks (tasks
    /// a request spawns, which other worker threads may still be starting)
    /// or issued from outside any task on a multi-thread runtime wait out
    /// the window. Zero dispatches as soon as the batch task runs, which only
    /// batches loads issued in the same poll (`join_all`). See
    /// [`DEFAULT_BATCH_WINDOW`] for how the default was chosen, and
    /// [`wait_full_window`](Self::wait_full_window) to batch loads that
    /// arrive after an await.
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// Makes every batch window last its whole length (or until it holds a
    /// full provider call), as async-graphql's DataLoader does, instead of
    /// dispatching as soon as the keys stopped coming. Worth it only when
    /// the loads of one request arrive after awaits of their own (a
    /// resolver that queries something else first) within the window;
    /// otherwise it only adds latency. Default: `false`.
    pub fn wait_full_window(mut self, wait: bool) -> Self {
        self.wait_full_window = wait;
        self
    }

    /// The limit on one provider call. A call that exceeds it is abandoned
    /// and counts as a transient failure (retried per the
    /// [`retry`](Self::retry) policy, then
    /// [`Error::ProviderTimeout`]). Must be non-zero, and shorter than the
    /// store's bound on a fill, if it has one.
    pub fn provider_timeout(mut self, timeout: Duration) -> Self {
        self.provider_timeout = timeout;
        self
    }

    /// How many chunks of one batch (when its misses exceed
    /// `max_batch_size`) call the provider at the same time. The default, 1,
    /// sends them one after another, so the rate limiter sees a steady
    /// stream. Must be at least 1.
    pub fn chunk_concurrency(mut self, concurrency: usize) -> Self {
        self.chunk_concurrency = concurrency;
        self
    }

    /// How failed provider calls are retried; see [`RetryPolicy`] and
    /// [`BatchFetch::classify`].
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Stale-while-revalidate (RFC 5861): for `window` past its expiry, an
    /// entry is served at once while one background refresh renews it. The
    /// refresh only *tries* the key's lock, so it never queues behind
    /// another refresher or filler (anywhere in the fleet); one refresh per
    /// key runs per process. Counted in `stale_served` and `refreshes`.
    /// Invalidated entries are never served. Off (zero) by default.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_while_revalidate = window.min(MAX_TTL);
        self
    }

    /// Stale-if-error (RFC 5861): for `window` past its expiry, an entry is
    /// served when refilling it fails at the provider (an error, a panic, a
    /// timeout, throttling); past the window the failure is returned.
    /// Invalidated entries are never served. Off (zero) by default.
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = window.min(MAX_TTL);
        self
    }

    /// Adds a bounded process-local tier in front of the store: up to
    /// `capacity` entries, each kept at most `ttl`. Off by default.
    ///
    /// It answers repeated loads without a store round trip, and is evicted
    /// by the store's invalidation events (from every instance), flushed
    /// whole when the event connection was lost (events may have been
    /// missed). The staleness it adds: after an invalidation returns on
    /// another instance, this instance may serve the old entry until the
    /// event arrives (typically milliseconds: one `NOTIFY` delivery), and if
    /// events are lost without the connection noticing, for at most `ttl`.
    /// Invalidations made through this cache evict it at once.
    ///
    /// Needs a tokio runtime when the cache is built, and a store that
    /// publishes events ([`MemoryStore`] and `PgStore` do).
    pub fn local_tier(mut self, capacity: u64, ttl: Duration) -> Self {
        self.local_tier = Some((capacity, ttl.min(MAX_TTL)));
        self
    }

    /// Limits provider calls made by this cache (this process).
    ///
    /// Under any rate limit (this one, [`rate_limit_keys`](Self::rate_limit_keys)
    /// or [`fleet_rate_limit`](Self::fleet_rate_limit)), a call that has to
    /// wait for its budget takes in the keys of calls that start while it
    /// waits, up to the provider's `max_batch_size`: when the limit binds,
    /// each call the budget allows carries as many keys as it can
    /// ([`Stats::merged_calls`](crate::Stats::merged_calls) counts the calls
    /// saved). A call whose budget is there is made at once with its own
    /// keys. Keys of different fills share that call's outcome: its retries,
    /// and its error if it fails.
    pub fn rate_limit_calls(mut self, quota: Quota) -> Self {
        self.calls_quota = Some(quota);
        self
    }

    /// Limits keys sent to the provider by this cache (this process). The
    /// quota's burst must be at least the provider's `max_batch_size`. Keys
    /// that join a waiting call (see
    /// [`rate_limit_calls`](Self::rate_limit_calls)) are charged before it
    /// is made.
    pub fn rate_limit_keys(mut self, quota: Quota) -> Self {
        self.keys_quota = Some(quota);
        self
    }

    /// Limits provider calls across every instance sharing `limit`'s table,
    /// and pauses them all when the provider asks one of them to back off.
    /// A call that finds the budget spent takes the next free turn and
    /// waits for it, so turns go in the order calls asked (see
    /// [`PgRateLimit`](crate::PgRateLimit)). Calls waiting for this budget
    /// share calls as described at
    /// [`rate_limit_calls`](Self::rate_limit_calls); with a
    /// [`PgStore`](crate::PgStore) in its default fill mode and a provider
    /// that implements [`BatchFetch::parse_key`](crate::BatchFetch::parse_key),
    /// also with the fills of other instances: a call that waits for its
    /// turn carries the keys they start missing meanwhile
    /// ([`Stats::carried_keys`](crate::Stats::carried_keys) counts them).
    #[cfg(feature = "postgres")]
    pub fn fleet_rate_limit(mut self, limit: crate::PgRateLimit) -> Self {
        self.fleet = Some(Arc::new(limit));
        self
    }

    /// Builds the cache.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the provider's namespace is longer than
    /// [`MAX_NAMESPACE_LEN`] or contains a NUL character, the TTL, negative
    /// TTL, provider timeout or chunk concurrency is zero, the provider's
    /// `max_batch_size` is zero,
    /// the keys quota's burst is below `max_batch_size`, or the provider
    /// timeout is not shorter than the store's bound on a fill.
    pub fn build(self) -> Result<Cache<F>, Error> {
        let namespace = self.provider.namespace();
        if namespace.len() > MAX_NAMESPACE_LEN {
            return Err(Error::config(format!(
                "the provider's namespace is {} bytes long; at most {MAX_NAMESPACE_LEN} \
                 (its invalidation events must fit in a Postgres notification)",
                namespace.len()
            )));
        }
        if namespace.contains('\0') {
            return Err(Error::config(
                "the provider's namespace contains a NUL character, which no store can keep",
            ));
        }
        if self.ttl.is_zero() {
            return Err(Error::config("ttl must be greater than zero"));
        }
        if self.negative_ttl.is_zero() {
            return Err(Error::config("negative_ttl must be greater than zero"));
        }
        if self.provider_timeout.is_zero() {
            return Err(Error::config("provider_timeout must be greater than zero"));
        }
        if self.chunk_concurrency == 0 {
            return Err(Error::config("chunk_concurrency must be at least 1"));
        }
        let max_batch_size = self.provider.max_batch_size();
        if max_batch_size == 0 {
            return Err(Error::config(format!(
                "provider `{}` has max_batch_size 0; it must be at least 1",
                self.provider.namespace()
            )));
        }
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn Store<F>>);
        let limiter = Limiter::new(
            self.calls_quota,
            self.keys_quota,
            self.fleet,
            max_batch_size,
        )?;
        let provider = ProviderCaller::new(
            self.provider,
            max_batch_size,
            CallPolicy {
                limiter,
                retry: self.retry,
                timeout: self.provider_timeout,
                chunk_concurrency: self.chunk_concurrency,
            },
        );
        if let Some(bound) = store.fill_time_limit() {
            // One call: every attempt may time out, every retry may wait,
            // and rate-limited answers may be waited out to the deadline.
            let worst = provider.worst_case_throttled(max_batch_size);
            if worst >= bound {
                return Err(Error::config(format!(
                    "a provider call with its retries may take {worst:?} (provider_timeout {:?} x {} \
                     attempts, plus backoffs, plus the rate-limit deadline {:?}), not shorter than \
                     the store's bound on a fill ({bound:?}): lower the provider timeout, attempts \
                     or rate-limit deadline, or raise the store's bound",
                    self.provider_timeout,
                    self.retry.max_attempts(),
                    self.retry.rate_limit_deadline()
                )));
            }
        }
        let local = match self.local_tier {
            None => None,
            Some((capacity, ttl)) => {
                if capacity == 0 || ttl.is_zero() {
                    return Err(Error::config(
                        "local_tier needs a capacity and a ttl above zero",
                    ));
                }
                if tokio::runtime::Handle::try_current().is_err() {
                    return Err(Error::config(
                        "local_tier must be built inside a tokio runtime (it follows invalidation events)",
                    ));
                }
                let events = store.subscribe().ok_or_else(|| {
                    Error::config(
                        "the store publishes no invalidation events, so a local tier could not be evicted",
                    )
                })?;
                let tier = Arc::new(LocalTier::new(capacity, ttl));
                LocalTier::follow(&tier, provider.namespace().clone(), events);
                Some(tier)
            }
        };
        let config = CacheConfig {
            ttl: self.ttl,
            negative_ttl: self.negative_ttl,
            batch_window: self.batch_window,
            wait_full_window: self.wait_full_window,
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
            max_batch_size,
            provider_timeout: self.provider_timeout,
            chunk_concurrency: self.chunk_concurrency,
            retry: self.retry,
        };
        let counters = Counters::new(provider.namespace());
        Ok(Cache {
            inner: Arc::new(CacheInner {
                provider,
                store,
                inflight: InFlight::new(),
                counters,
                config,
                local,
                refreshing: dashmap::DashMap::new(),
            }),
        })
    }
}
