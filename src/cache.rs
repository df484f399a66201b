//! [`Cache`]: the process-wide part, shared by every loader of one provider.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::inflight::InFlight;
use crate::provider::ProviderCaller;
use crate::stats::Counters;
use crate::store::{Fill, Filled, Lookup};
use crate::{BatchFetch, Error, Loader, MemoryStore, Stats, Store};

/// The default time a value stays fresh: 5 minutes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The default time a negative entry stays fresh: 1 minute.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// The default batch window: 500 µs.
///
/// Chosen by measurement (`cargo run --release --example batch_window`, 2
/// cores, 2 worker threads): requests that spawn 8 tasks at once, each
/// loading 10 keys, with an instant provider.
///
/// | window | batches / request | mean latency (1 request at a time) | with 16 concurrent requests |
/// |---|---|---|---|
/// | 0 | 5.15 | 0.13 ms | 7.90 batches, 0.46 ms |
/// | 50 µs | 1.00 | 1.27 ms | 1.00 batch, 2.11 ms |
/// | 500 µs | 1.00 | 1.72 ms | 1.00 batch, 2.65 ms |
/// | 1 ms | 1.00 | 2.25 ms | 1.00 batch, 3.20 ms |
/// | 5 ms | 1.00 | 6.27 ms | 1.00 batch, 7.25 ms |
///
/// A zero window splits such requests into several batches; any non-zero
/// window batches them whole, because tokio's timer rounds every sleep up to
/// its next 1 ms tick. A window guarantees at least its own length of
/// collection, so 500 µs leaves margin for tasks that do a little work before
/// they load, at half a millisecond less latency than 1 ms. `join_all` of
/// loads in one task lands in one batch with any window.
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(500);

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
    /// How long a loader collects keys before dispatching them as one batch.
    pub batch_window: Duration,
    /// The provider's `max_batch_size`, read once when the cache was built.
    pub max_batch_size: usize,
}

pub(crate) struct CacheInner<F: BatchFetch> {
    pub(crate) provider: ProviderCaller<F>,
    pub(crate) store: Arc<dyn Store<F>>,
    pub(crate) inflight: InFlight<F::Key, F::Value>,
    pub(crate) counters: Counters,
    pub(crate) config: CacheConfig,
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
        }
    }

    /// A new per-request loader. Cheap: create one per request (or per
    /// GraphQL execution) so that its memo lives as long as the request.
    pub fn loader(&self) -> Loader<F> {
        Loader::new(Arc::clone(&self.inner))
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
    /// Loads `keys` (deduplicated, led by the caller) from the store, filling
    /// what the store misses from the provider. Aligned with `keys`.
    pub(crate) async fn resolve(
        &self,
        keys: &[F::Key],
        tally: &mut Tally,
    ) -> Result<Vec<Option<F::Value>>, Error> {
        let namespace = self.provider.namespace();
        let looked = self.store.get(namespace, keys).await?;
        let mut values = Vec::with_capacity(keys.len());
        let mut missing = Vec::new();
        for (i, lookup) in looked.into_iter().enumerate() {
            values.push(match lookup {
                Lookup::Hit(value) => {
                    tally.store_hits += 1;
                    Some(value)
                }
                Lookup::NegativeHit => {
                    tally.store_hits += 1;
                    tally.negative_hits += 1;
                    None
                }
                Lookup::Undecodable => {
                    tally.undecodable += 1;
                    missing.push(i);
                    None
                }
                // `Lookup` is non-exhaustive for other stores; anything else
                // is a miss.
                _ => {
                    missing.push(i);
                    None
                }
            });
        }
        if missing.is_empty() {
            return Ok(values);
        }

        let missing_keys: Vec<F::Key> = missing.iter().map(|&i| keys[i].clone()).collect();
        let fill = Fill {
            namespace,
            keys: &missing_keys,
            ttl: self.config.ttl,
            negative_ttl: self.config.negative_ttl,
            provider: &self.provider,
            counters: &self.counters,
        };
        let filled = self.store.fill(fill).await?;
        if filled.len() != missing.len() {
            return Err(Error::Store {
                message: format!(
                    "store answered {} keys of a fill of {}",
                    filled.len(),
                    missing.len()
                )
                .into(),
                source: None,
            });
        }
        for (i, answer) in missing.into_iter().zip(filled) {
            values[i] = match answer {
                Filled::Stored(value) => {
                    tally.store_hits += 1;
                    tally.store_hits_after_lock += 1;
                    tally.negative_hits += usize::from(value.is_none());
                    value
                }
                Filled::Fetched(value) => {
                    tally.fetched += 1;
                    value
                }
            };
        }
        Ok(values)
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
#[must_use = "a builder does nothing until .build() is called"]
pub struct CacheBuilder<F: BatchFetch> {
    provider: F,
    store: Option<Arc<dyn Store<F>>>,
    ttl: Duration,
    negative_ttl: Duration,
    batch_window: Duration,
}

impl<F: BatchFetch> fmt::Debug for CacheBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("namespace", &self.provider.namespace())
            .field("custom_store", &self.store.is_some())
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .field("batch_window", &self.batch_window)
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

    /// How long a fetched value stays fresh. Must be non-zero.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// How long a negative entry (the provider has no such key) stays fresh.
    /// Must be non-zero.
    pub fn negative_ttl(mut self, negative_ttl: Duration) -> Self {
        self.negative_ttl = negative_ttl;
        self
    }

    /// How long a loader collects keys before dispatching them as one batch,
    /// counted from the first key of the batch. Zero dispatches as soon as
    /// the batch task runs, which only batches loads issued in the same poll
    /// (`join_all`). See [`DEFAULT_BATCH_WINDOW`] for how the default was
    /// chosen.
    pub fn batch_window(mut self, window: Duration) -> Self {
        self.batch_window = window;
        self
    }

    /// Builds the cache.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the TTL or negative TTL is zero, or the
    /// provider's `max_batch_size` is zero.
    pub fn build(self) -> Result<Cache<F>, Error> {
        if self.ttl.is_zero() {
            return Err(Error::config("ttl must be greater than zero"));
        }
        if self.negative_ttl.is_zero() {
            return Err(Error::config("negative_ttl must be greater than zero"));
        }
        let provider = ProviderCaller::new(self.provider)?;
        let config = CacheConfig {
            ttl: self.ttl,
            negative_ttl: self.negative_ttl,
            batch_window: self.batch_window,
            max_batch_size: provider.max_batch_size(),
        };
        let store = self
            .store
            .unwrap_or_else(|| Arc::new(MemoryStore::new()) as Arc<dyn Store<F>>);
        Ok(Cache {
            inner: Arc::new(CacheInner {
                provider,
                store,
                inflight: InFlight::new(),
                counters: Counters::default(),
                config,
            }),
        })
    }
}
