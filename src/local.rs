//! The optional process-local tier: a bounded in-process cache in front of
//! the store, evicted by the store's invalidation events.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast;

use crate::entry::Shared;
use crate::{Invalidation, StoreEvent};

/// How many groups the keys' invalidation marks are kept in: an
/// invalidation discards the inserts in flight of its keys' groups only.
const SHARDS: usize = 256;

/// The shard of a key's text: FNV-1a, the same in every process.
fn shard_of(key: &str) -> usize {
    usize::try_from(crate::store::fnv1a64(key.bytes()) % SHARDS as u64).unwrap_or(0)
}

/// Entries by key text (`None` is a negative entry), each with the time it
/// stops being fresh in the store.
///
/// An entry read from the store before an invalidation of its key is never
/// inserted after it: every invalidation heard takes the next number of
/// `epoch` and marks its keys' shards with it (a flush marks all of them);
/// a batch notes `epoch` before it reads, and its insert of a key is
/// dropped when the key's shard was marked since. An invalidation thus
/// costs the inserts in flight of about `keys / SHARDS` of the keys, not
/// all of them.
pub(crate) struct LocalTier<V> {
    entries: moka::sync::Cache<String, (Option<Shared<V>>, SystemTime)>,
    /// The number of the last invalidation heard.
    epoch: AtomicU64,
    /// Per shard, the number of the last invalidation of a key in it.
    marks: Box<[AtomicU64]>,
    /// The number of the last flush (every shard marked).
    flushed: AtomicU64,
}

impl<V: Clone + Send + Sync + 'static> LocalTier<V> {
    pub(crate) fn new(capacity: u64, ttl: Duration) -> Self {
        LocalTier {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            epoch: AtomicU64::new(0),
            marks: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            flushed: AtomicU64::new(0),
        }
    }

    fn mark_of(&self, key: &str) -> &AtomicU64 {
        &self.marks[shard_of(key)]
    }

    /// Whether `key` was invalidated (or everything flushed) since `epoch`.
    fn invalidated_since(&self, epoch: u64, key: &str) -> bool {
        self.flushed.load(Ordering::Acquire) > epoch
            || self.mark_of(key).load(Ordering::Acquire) > epoch
    }

    /// A fresh entry (the store's expiry is honoured too).
    pub(crate) fn get(&self, key: &str) -> Option<Option<Shared<V>>> {
        let (entry, expires_at) = self.entries.get(key)?;
        (expires_at > SystemTime::now()).then_some(entry)
    }

    /// The epoch to hand back to [`insert`](Self::insert) for what is read
    /// from the store from now on.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Keeps `entry` (fresh until `expires_at`) unless an invalidation of
    /// its key's shard was heard since `epoch`. Checked again after
    /// inserting, so an eviction racing the insert never leaves the entry
    /// behind.
    pub(crate) fn insert(
        &self,
        epoch: u64,
        key: String,
        entry: Option<Shared<V>>,
        expires_at: SystemTime,
    ) {
        if self.invalidated_since(epoch, &key) {
            return;
        }
        self.entries.insert(key.clone(), (entry, expires_at));
        if self.invalidated_since(epoch, &key) {
            self.entries.invalidate(&key);
        }
    }

    /// Drops `keys`, and the inserts in flight of their shards.
    pub(crate) fn evict(&self, keys: &[String]) {
        let number = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        for key in keys {
            self.mark_of(key).fetch_max(number, Ordering::AcqRel);
            self.entries.invalidate(key);
        }
    }

    /// Drops everything, and every insert in flight.
    pub(crate) fn flush(&self) {
        let number = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.flushed.fetch_max(number, Ordering::AcqRel);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalidation_drops_only_the_inserts_of_its_keys_shards() {
        let tier: LocalTier<u64> = LocalTier::new(100, Duration::from_secs(60));
        let later = SystemTime::now() + Duration::from_secs(60);
        assert_ne!(
            shard_of("1"),
            shard_of("2"),
            "the integration test relies on it"
        );
        let epoch = tier.epoch();
        tier.evict(&["2".to_string()]);
        tier.insert(
            epoch,
            "1".into(),
            Some(Shared::new(crate::Entry::new(1, 1, later, later))),
            later,
        );
        tier.insert(
            epoch,
            "2".into(),
            Some(Shared::new(crate::Entry::new(2, 1, later, later))),
            later,
        );
        assert!(tier.get("1").is_some(), "another shard's insert is kept");
        assert!(
            tier.get("2").is_none(),
            "an insert read before its key's invalidation is dropped"
        );
        let epoch = tier.epoch();
        tier.flush();
        tier.insert(epoch, "3".into(), None, later);
        assert!(
            tier.get("3").is_none(),
            "a flush drops every insert in flight"
        );
    }
}
