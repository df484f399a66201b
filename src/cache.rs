//! [`Cache`]: the process-wide part, shared by every loader of one provider.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::inflight::InFlight;
use crate::limit::{FleetLimiter, Limiter, Prepaid};
use crate::local::LocalTier;
use crate::provider::{CallPolicy, ProviderCaller};
use crate::stats::Counters;
use crate::store::{Fill, Filled, Lookup};
use crate::{
    BatchFetch, Entry, Error, Invalidation, Invalidations, Loader, MemoryStore, Quota, RetryPolicy,
    Stats, Store, WriteError,
};

/// The default time a value stays fresh: 5 minutes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The default time a negative entry stays fresh: 1 minute.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// The longest TTL kept: about 100 years. Longer TTLs (`Duration::MAX` for
/// "never expire") are capped to it.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The default limit on one provider call: 10 s.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default batch window: 500 µs, the longest a loader collects keys.
///
/// A window ends early when nothing more can come: keys a request task
/// issues by itself (a `join_all`, `load_many`, resolvers of one task) are
/// dispatched as soon as that task stopped issuing them and no key came for
/// 200 µs more, once a window holds a full provider call it is dispatched
/// at once, and only keys from several tasks (tasks a request spawned at
/// the same moment) or from outside any task wait out the whole window.
///
/// Chosen by measurement (`cargo run --release --example batch_window`, 2
/// cores, 2 worker threads): requests that spawn 8 tasks at once, each
/// loading 10 keys, with an instant provider.
///
/// | window | batches / request | mean latency (1 request at a time) | with 16 concurrent requests |
/// |---|---|---|---|
/// | 0 | 7.82 | 0.14 ms | 7.95 batches, 0.94 ms |
/// | 50 µs | 1.00 | 1.24 ms | 1.02 batches, 1.53 ms |
/// | 500 µs | 1.00 | 1.80 ms | 1.00 batch, 3.67 ms |
/// | 1 ms | 1.00 | 2.35 ms | 1.00 batch, 4.19 ms |
/// | 5 ms | 1.01 | 6.44 ms | 1.02 batches, 8.37 ms |
///
/// A zero window splits such requests into several batches; a non-zero one
/// batches them whole, because tokio's timer rounds every sleep up to its
/// next 1 ms tick, unless all but the first task start their loads more
/// than 200 µs after it (about 1 request in 100 at the longer windows
/// here); [`CacheBuilder::wait_full_window`] waits the whole window for
/// them. 500 µs leaves margin for tasks that do a little work before they
/// load, at half a millisecond less latency than 1 ms. One task's loads do
/// not wait for the timer at all: 1,000 concurrent loads of one request
/// take 0.49x async-graphql's time (`cargo bench --bench loader`).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(500);

/// The longest [`BatchFetch::namespace`] a cache accepts, in bytes. Every
/// invalidation event names its namespace, and a Postgres notification
/// carries less than 8,000 bytes (JSON escaping can make a namespace
/// several times longer): a longer namespace would make every invalidation
/// fail.
pub const MAX_NAMESPACE_LEN: usize = 1024;

/// The process-wide cache of one provider: the in-flight table (tier 1) in
/// front of a [`Store`] (tier 2) in front of the provider (tier 3).
///
/// Build one per provider per process with [`Cache::builder`], keep it in the
/// application state, and create a [`Loader`] per request with
/// [`Cache::loader`]. `Cache` is cheap to clone (an `Arc` inside); clones
/// share everything.
///
/// A cache spawns its batches on the tokio runtime of the task that loads;
/// load only from within a tokio runtime.
pub struct Cache<F: BatchFetch> {
    pub(crate) inner: Arc<CacheInner<F>>,
}

impl<F: BatchFetch> Clone for Cache<F> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<F: BatchFetch> fmt::Debug for Cache<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", self.inner.provider.namespace())
            .field("config", &self.inner.config)
            .field("in_flight", &self.inner.inflight.len())
            .finish_non_exhaustive()
    }
}

/// The settings a cache was built with; from [`Cache::config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// How long a fetched value stays fresh in the store.
    pub ttl: Duration,
    /// How long a negative entry ("not found") stays fresh in the store.
    pub negative_ttl: Duration,
    /// The longest a loader collects keys before dispatching them as one
    /// batch.
    pub batch_window: Duration,
    /// Whether a loader always waits its whole batch window (or until it
    /// holds a full provider call), instead of dispatching as soon as no
    /// more keys arrive.
    pub wait_full_window: bool,
    /// How long past its expiry an entry is still served at once while one
    /// background refresh renews it (zero: off).
    pub stale_while_revalidate: Duration,
    /// How long past its expiry an entry is served when refilling it fails
    /// at the provider (zero: off).
    pub stale_if_error: Duration,
    /// The provider's `max_batch_size`, read once when the cache was built.
    pub max_batch_size: usize,
    /// The limit on one provider call; past it the call counts as a transient
    /// failure.
    pub provider_timeout: Duration,
    /// How many chunks of one batch call the provider at the same time.
    pub chunk_concurrency: usize,
    /// How failed provider calls are retried.
    pub retry: RetryPolicy,
}

pub(crate) struct CacheInner<F: BatchFetch> {
    pub(crate) provider: ProviderCaller<F>,
    pub(crate) store: Arc<dyn Store<F>>,
    pub(crate) inflight: InFlight<F::Key, Entry<F::Value>>,
    pub(crate) counters: Counters,
    pub(crate) config: CacheConfig,
    pub(crate) local: Option<Arc<LocalTier<F::Value>>>,
    /// Keys a background refresh is renewing in this process.
    pub(crate) refreshing: dashmap::DashMap<F::Key, ()>,
}

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

    /// A new per-request loader. Cheap: create one per request (or per
    /// GraphQL execution) so that its memo lives as long as the request.
    pub fn loader(&self) -> Loader<F> {
        Loader::new(Arc::clone(&self.inner))
    }

    /// Invalidates `keys` after their source of truth changed: their entries
    /// are never served again, and the next load of each fetches it afresh.
    ///
    /// Invalidation takes the same per-key locks as a fill: it waits for
    /// fills of the keys in progress anywhere (in every instance sharing the
    /// store), and no fill can interleave with it. So once it returns, a
    /// load that starts afterwards, on any instance, returns a value the
    /// provider gave after the invalidation took the key's lock; a slow fill
    /// that fetched the old value before cannot write it back. The classic
    /// race ("invalidate, then a slow reader writes back old data") cannot
    /// happen. Change the source first, then invalidate.
    ///
    /// Not covered: a [`Loader`] that already answered a key keeps its
    /// answer for its life (one request, one value per key; use
    /// [`Loader::clear`] to forget it).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it returns may leave the keys invalidated
    /// or not (each group of keys is one transaction); invalidate again.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the store fails, [`Error::LockTimeout`] when a
    /// fill held a key longer than the store's lock timeout.
    pub async fn invalidate(&self, keys: impl IntoIterator<Item = F::Key>) -> Result<(), Error> {
        let keys: Vec<F::Key> = keys.into_iter().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let result = self
            .inner
            .store
            .invalidate(self.inner.provider.namespace(), &keys)
            .await;
        if let Some(local) = &self.inner.local {
            // At once, whether or not the store succeeded: the entries may be
            // gone there already.
            let texts: Vec<String> = keys.iter().map(ToString::to_string).collect();
            local.evict(&texts);
        }
        if result.is_ok() {
            Counters::add(&self.inner.counters.invalidations, keys.len());
            tracing::debug!(namespace = %self.inner.provider.namespace(), keys = keys.len(), "invalidated");
        }
        result
    }

    /// Invalidates every key of this cache's namespace (after a bulk change
    /// of the source). It waits for the namespace's fills in progress and
    /// holds new ones back until it is durable, so the guarantee of
    /// [`invalidate`](Self::invalidate) holds for every key.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the namespace invalidated or not;
    /// invalidate again.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] or [`Error::LockTimeout`].
    pub async fn invalidate_namespace(&self) -> Result<(), Error> {
        let result = self
            .inner
            .store
            .invalidate_namespace(self.inner.provider.namespace())
            .await;
        if let Some(local) = &self.inner.local {
            local.flush();
        }
        result
    }

    /// Write-through under the keys' locks: runs `write` (your update of the
    /// source of truth) while holding the locks of `keys`, then invalidates
    /// them before the locks are released, and returns `write`'s output.
    ///
    /// Writers and readers of these keys are serialized: no fill runs
    /// alongside the write, none that started before can write back what it
    /// read, and loads that start after this returns fetch afresh. This is
    /// the stronger form of "invalidate first, then write". Keep `write`
    /// short: it holds the keys' locks (and, with `PgStore`, a connection
    /// and a transaction bounded by its idle-in-transaction timeout). Do not
    /// load the written keys through this store inside `write`: the load
    /// would wait for the locks the write holds (with `PgStore` until the
    /// lock timeout, with `MemoryStore` for ever); and if your update uses
    /// the store's pool, size it for one more connection per write.
    ///
    /// The keys are invalidated whether `write` succeeded or not (a failed
    /// write may have changed part of the source).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future releases the locks; `write` may have run or not,
    /// and the keys may be left valid: invalidate them again.
    ///
    /// # Errors
    ///
    /// A [`WriteError`] when the cache failed ([`Error::Store`],
    /// [`Error::LockTimeout`]): with the update's output when the update ran
    /// and the failure came after it (the keys may then be left valid:
    /// invalidate them again), without when it did not run. `write`'s own
    /// result is returned inside `Ok` once the keys are invalidated.
    pub async fn write<T: Send>(
        &self,
        keys: impl IntoIterator<Item = F::Key>,
        write: impl std::future::Future<Output = T> + Send,
    ) -> Result<T, WriteError<T>> {
        let keys: Vec<F::Key> = keys.into_iter().collect();
        let output = std::sync::Mutex::new(None);
        let work: futures::future::BoxFuture<'_, ()> = Box::pin(async {
            let value = write.await;
            *output.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        });
        let locked = self
            .inner
            .store
            .write_locked(self.inner.provider.namespace(), &keys, work)
            .await;
        if let Some(local) = &self.inner.local {
            let texts: Vec<String> = keys.iter().map(ToString::to_string).collect();
            local.evict(&texts);
        }
        let output = output.into_inner().unwrap_or_else(|e| e.into_inner());
        match (locked, output) {
            (Ok(()), Some(output)) => Ok(output),
            (Ok(()), None) => Err(WriteError {
                output: None,
                error: Error::Closed,
            }),
            (Err(error), output) => Err(WriteError { output, error }),
        }
    }

    /// Compare-and-set for update-on-write users (optimistic locking): if the
    /// entry of `key` is still at version `expected` (from
    /// [`Loader::load_entry`]), replaces its value with `value`, fresh for
    /// the cache's TTL, and returns the new version. Takes the key's lock, so
    /// it serializes with fills and invalidations.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the put done or not; load the entry to
    /// see which.
    ///
    /// # Errors
    ///
    /// [`Error::VersionMismatch`] when the entry changed (or is gone) since
    /// it was read; [`Error::Store`] or [`Error::LockTimeout`].
    pub async fn put_if_version(
        &self,
        key: F::Key,
        expected: u64,
        value: F::Value,
    ) -> Result<u64, Error> {
        let put = self
            .inner
            .store
            .put_if_version(
                self.inner.provider.namespace(),
                &key,
                expected,
                value,
                self.inner.config.ttl,
            )
            .await;
        if let Some(local) = &self.inner.local {
            local.evict(&[key.to_string()]);
        }
        put
    }

    /// The invalidations of this cache's namespace, from every instance
    /// sharing the store: an event bus for the application. It yields
    /// [`Invalidation::Missed`] when events may have been lost (the store's
    /// event connection was re-established, or this subscriber fell more
    /// than a few thousand events behind), and ends when the store stops
    /// publishing. Empty for a store without events.
    ///
    /// Events are delivered after the invalidating transaction committed,
    /// typically within milliseconds; they are a notification, not the
    /// guarantee: [`invalidate`](Self::invalidate) itself is what makes
    /// later loads fresh. The stream is `Unpin`; see [`Invalidations`] for
    /// what a subscriber that lags behind sees.
    pub fn invalidations(&self) -> Invalidations {
        let namespace: Arc<str> = self.inner.provider.namespace().clone();
        let events = futures::stream::unfold(self.inner.store.subscribe(), move |receiver| {
            let namespace = namespace.clone();
            async move {
                let mut receiver = receiver?;
                loop {
                    match receiver.recv().await {
                        Ok(event) if event.concerns(&namespace) => {
                            return Some((event.invalidation, Some(receiver)));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            return Some((Invalidation::Missed, Some(receiver)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Invalidations::new(Box::pin(events))
    }

    /// The number of entries in the process-local tier (0 without one).
    pub fn local_len(&self) -> u64 {
        self.inner.local.as_ref().map_or(0, |local| local.len())
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot(self.inner.inflight.len())
    }

    /// The settings this cache was built with.
    pub fn config(&self) -> CacheConfig {
        self.inner.config
    }

    /// The provider's namespace.
    pub fn namespace(&self) -> &str {
        self.inner.provider.namespace()
    }

    /// The provider this cache fetches from.
    pub fn provider(&self) -> &F {
        self.inner.provider.provider()
    }
}

impl<F: BatchFetch> CacheInner<F> {
    /// The optimistic read of `keys`; aligned with `keys`.
    pub(crate) async fn read(
        &self,
        keys: &[F::Key],
        tally: &mut Tally,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        let grace = self
            .config
            .stale_while_revalidate
            .max(self.config.stale_if_error);
        let looked = self
            .store
            .get(self.provider.namespace(), keys, grace)
            .await?;
        if looked.len() != keys.len() {
            return Err(Error::Store {
                message: format!(
                    "store answered {} keys of a get of {}",
                    looked.len(),
                    keys.len()
                )
                .into(),
                source: None,
            });
        }
        for lookup in &looked {
            match lookup {
                Lookup::Hit(_) => tally.store_hits += 1,
                Lookup::NegativeHit => {
                    tally.store_hits += 1;
                    tally.negative_hits += 1;
                }
                Lookup::Undecodable => tally.undecodable += 1,
                _ => {}
            }
        }
        Ok(looked)
    }

    /// Fills `keys` (missed by the read, led by the caller) through the
    /// store; aligned with `keys`, each key's outcome on its own (a fill
    /// that failed part way answers the keys it wrote). `leave` is called
    /// with indices into `keys` right before their writes become visible.
    pub(crate) async fn fill(
        &self,
        keys: &[F::Key],
        leave: &(dyn Fn(&[usize]) + Send + Sync),
        tally: &mut Tally,
    ) -> Result<Vec<crate::inflight::Outcome<Entry<F::Value>>>, Error> {
        let prepaid = Prepaid::default();
        let fill = Fill {
            namespace: self.provider.namespace(),
            keys,
            ttl: self.config.ttl,
            negative_ttl: self.config.negative_ttl,
            provider: &self.provider,
            prepaid: &prepaid,
            counters: &self.counters,
            leave,
        };
        let filled = self.store.fill(fill).await?;
        if filled.len() != keys.len() {
            return Err(Error::Store {
                message: format!(
                    "store answered {} keys of a fill of {}",
                    filled.len(),
                    keys.len()
                )
                .into(),
                source: None,
            });
        }
        Ok(filled
            .into_iter()
            .map(|answer| match answer {
                Filled::Stored(value) => {
                    tally.store_hits += 1;
                    tally.store_hits_after_lock += 1;
                    tally.negative_hits += usize::from(value.is_none());
                    Ok(value)
                }
                Filled::Fetched(value) => {
                    tally.fetched += 1;
                    Ok(value)
                }
                Filled::Failed(err) => Err(err),
            })
            .collect())
    }
}

impl<F: BatchFetch> CacheInner<F> {
    /// Renews `keys` in the background, once per key in this process, and
    /// not at all where another filler holds a key's lock.
    pub(crate) fn spawn_refresh(self: &Arc<Self>, keys: Vec<F::Key>) {
        let keys: Vec<F::Key> = keys
            .into_iter()
            .filter(|key| self.refreshing.insert(key.clone(), ()).is_none())
            .collect();
        if keys.is_empty() {
            return;
        }
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let renewed = cache.refresh(&keys).await;
            for key in &keys {
                cache.refreshing.remove(key);
            }
            match renewed {
                Ok(fetched) => Counters::add(&cache.counters.refreshes, fetched),
                Err(err) => tracing::warn!(
                    namespace = %cache.provider.namespace(),
                    error = %err,
                    "background refresh failed; the stale entries stay until their grace ends"
                ),
            }
        });
    }

    /// One background refresh; the number of keys it fetched.
    async fn refresh(&self, keys: &[F::Key]) -> Result<usize, Error> {
        let prepaid = Prepaid::default();
        let fill = Fill {
            namespace: self.provider.namespace(),
            keys,
            ttl: self.config.ttl,
            negative_ttl: self.config.negative_ttl,
            provider: &self.provider,
            prepaid: &prepaid,
            counters: &self.counters,
            // Nobody joins a refresh.
            leave: &|_: &[usize]| {},
        };
        let filled = self.store.refresh(fill).await?;
        Ok(filled.map_or(0, |answers| {
            answers
                .iter()
                .filter(|a| matches!(a, Filled::Fetched(_)))
                .count()
        }))
    }
}

/// Per-batch counts, recorded into the cache's counters and the batch's span
/// when the batch ends.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) coalesced: usize,
    pub(crate) store_hits: usize,
    pub(crate) negative_hits: usize,
    pub(crate) store_hits_after_lock: usize,
    pub(crate) undecodable: usize,
    pub(crate) fetched: usize,
}

impl Tally {
    pub(crate) fn record(&self, counters: &Counters) {
        Counters::add(&counters.store_hits, self.store_hits);
        Counters::add(&counters.negative_hits, self.negative_hits);
        Counters::add(&counters.store_hits_after_lock, self.store_hits_after_lock);
        Counters::add(&counters.undecodable, self.undecodable);
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
    /// its keys came from the one task that started it (a `join_all`,
    /// `load_many`, resolvers of one request task), once that task stopped
    /// issuing loads and no key arrived for 200 µs more. Keys from several
    /// tasks (tasks a request spawned at the same moment, which other worker
    /// threads may still be running) or from outside any task on a
    /// multi-thread runtime wait out the window. Zero dispatches as soon as the batch task runs, which only
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
    pub fn rate_limit_calls(mut self, quota: Quota) -> Self {
        self.calls_quota = Some(quota);
        self
    }

    /// Limits keys sent to the provider by this cache (this process). The
    /// quota's burst must be at least the provider's `max_batch_size`.
    pub fn rate_limit_keys(mut self, quota: Quota) -> Self {
        self.keys_quota = Some(quota);
        self
    }

    /// Limits provider calls across every instance sharing `limit`'s table,
    /// and pauses them all when the provider asks one of them to back off.
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
        Ok(Cache {
            inner: Arc::new(CacheInner {
                provider,
                store,
                inflight: InFlight::new(),
                counters: Counters::default(),
                config,
                local,
                refreshing: dashmap::DashMap::new(),
            }),
        })
    }
}
