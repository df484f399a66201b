//! The optional process-local tier: a bounded in-process cache in front of
//! the store, evicted by the store's invalidation events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use crate::{Entry, Invalidation, StoreEvent};

/// Entries by key text (`None` is a negative entry), each with the time it
/// stops being fresh in the store.
pub(crate) struct LocalTier<V> {
    entries: moka::sync::Cache<String, (Option<Entry<V>>, SystemTime)>,
    /// Bumped by every invalidation this tier hears of: an entry read from
    /// the store before an invalidation is not inserted after it.
    epoch: AtomicU64,
}

impl<V: Clone + Send + Sync + 'static> LocalTier<V> {
    pub(crate) fn new(capacity: u64, ttl: Duration) -> Self {
        LocalTier {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            epoch: AtomicU64::new(0),
        }
    }

    /// A fresh entry (the store's expiry is honoured too).
    pub(crate) fn get(&self, key: &str) -> Option<Option<Entry<V>>> {
        let (entry, expires_at) = self.entries.get(key)?;
        (expires_at > SystemTime::now()).then_some(entry)
    }

    /// The epoch to hand back to [`insert`](Self::insert) for what is read
    /// from the store from now on.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `entry` (fresh until `expires_at`) unless an invalidation was
    /// heard since `epoch`. Checked again after inserting, so an eviction
    /// racing the insert never leaves the entry behind.
    pub(crate) fn insert(
        &self,
        epoch: u64,
        key: String,
        entry: Option<Entry<V>>,
        expires_at: SystemTime,
    ) {
        if self.epoch() != epoch {
            return;
        }
        self.entries.insert(key.clone(), (entry, expires_at));
        if self.epoch() != epoch {
            self.entries.invalidate(&key);
        }
    }

    pub(crate) fn evict(&self, keys: &[String]) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        for key in keys {
            self.entries.invalidate(key);
        }
    }

    pub(crate) fn flush(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.entries.invalidate_all();
    }

    pub(crate) fn len(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }

    /// Applies the store's events for `namespace` until the tier is dropped.
    pub(crate) fn follow(
        tier: &Arc<Self>,
        namespace: Arc<str>,
        mut events: broadcast::Receiver<StoreEvent>,
    ) {
        let tier: Weak<Self> = Arc::downgrade(tier);
        tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let Some(tier) = tier.upgrade() else {
                    return;
                };
                match event {
                    Ok(event) if event.concerns(&namespace) => match event.invalidation {
                        Invalidation::Keys(keys) => tier.evict(&keys),
                        _ => tier.flush(),
                    },
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => tier.flush(),
                    Err(broadcast::error::RecvError::Closed) => {
                        tier.flush();
                        return;
                    }
                }
            }
        });
    }
}
