//! What one cache does for a batch: the optimistic read, the fill and the
//! background refresh, over its store and its provider caller, and the
//! per-batch counts they keep. Knows nothing of loaders or batch windows.

use std::sync::Arc;

use crate::caller::ProviderCaller;
use crate::entry::Shared;
use crate::inflight::InFlight;
use crate::limit::Prepaid;
use crate::local::LocalTier;
use crate::stats::Counters;
use crate::store::{Fill, Filled, Lookup};
use crate::{BatchFetch, CacheConfig, Error, Store};

pub(crate) struct CacheInner<F: BatchFetch> {
    pub(crate) provider: ProviderCaller<F>,
    pub(crate) store: Arc<dyn Store<F>>,
    pub(crate) inflight: InFlight<F::Key, Shared<F::Value>>,
    pub(crate) counters: Counters,
    pub(crate) config: CacheConfig,
    pub(crate) local: Option<Arc<LocalTier<F::Value>>>,
    /// Keys a background refresh is renewing in this process.
    pub(crate) refreshing: dashmap::DashMap<F::Key, ()>,
}

impl<F: BatchFetch> CacheInner<F> {
    /// What a store needs to fill `keys` for this cache.
    fn fill_of<'a>(
        &'a self,
        keys: &'a [F::Key],
        prepaid: &'a Prepaid,
        leave: &'a (dyn Fn(&[usize]) + Send + Sync),
    ) -> Fill<'a, F> {
        Fill {
            namespace: self.provider.namespace(),
            keys,
            ttl: self.config.ttl,
            negative_ttl: self.config.negative_ttl,
            provider: &self.provider,
            prepaid,
            counters: &self.counters,
            leave,
        }
    }

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
    ) -> Result<Vec<crate::inflight::Outcome<Shared<F::Value>>>, Error> {
        let prepaid = Prepaid::default();
        let started = tokio::time::Instant::now();
        let filled = self.store.fill(self.fill_of(keys, &prepaid, leave)).await;
        self.counters.record_fill(started.elapsed());
        let filled = filled?;
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
                    Ok(value.map(Shared::new))
                }
                Filled::Fetched(value) => {
                    tally.fetched += 1;
                    Ok(value.map(Shared::new))
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
        // Nobody joins a refresh.
        let fill = self.fill_of(keys, &prepaid, &|_: &[usize]| {});
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
