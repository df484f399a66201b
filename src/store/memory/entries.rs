//! Where a [`MemoryStore`](super::MemoryStore) keeps its entries: a map
//! bounded in entries, evicting by TinyLFU (moka), or an unbounded one
//! whose expired entries are swept.
//!
//! Either way an entry is only ever dropped, never changed in place: an
//! evicted entry is a miss, filled again under a lease like any other, and
//! versions come from the store's own counter, so they keep growing for a
//! key across evictions.

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use dashmap::DashMap;
use tokio::time::Instant;

/// One entry.
pub(super) struct Stored {
    /// `None` is a negative entry.
    pub(super) value: Option<Arc<dyn Any + Send + Sync>>,
    /// Freshness, on tokio's clock (paused-time tests move it).
    pub(super) expires_at: Instant,
    pub(super) version: u64,
    pub(super) fetched_at: SystemTime,
    pub(super) expires_wall: SystemTime,
}

/// The entries, by entry key.
pub(super) enum Entries {
    /// At most `capacity` entries: past it, moka evicts the entries least
    /// likely to be asked again (TinyLFU admission, LRU eviction). Expired
    /// entries are not dropped at their expiry (they may still be served
    /// within a stale grace): they are overwritten by the next fill or
    /// evicted as the least used.
    Bounded(moka::sync::Cache<String, Arc<Stored>>),
    /// Every entry until it expires; expired entries are swept once the
    /// writes since the last sweep outnumber what that sweep left.
    Unbounded(Unbounded),
}

pub(super) struct Unbounded {
    map: DashMap<String, Arc<Stored>>,
    writes_since_sweep: AtomicUsize,
    /// Entries left by the last sweep.
    swept_len: AtomicUsize,
    /// A sweep is running (on a task of its own).
    sweeping: AtomicBool,
}

impl Entries {
    pub(super) fn bounded(capacity: u64) -> Self {
        Entries::Bounded(moka::sync::Cache::builder().max_capacity(capacity).build())
    }

    pub(super) fn unbounded() -> Self {
        Entries::Unbounded(Unbounded {
            map: DashMap::new(),
            writes_since_sweep: AtomicUsize::new(0),
            swept_len: AtomicUsize::new(0),
            sweeping: AtomicBool::new(false),
        })
    }

    /// The most entries kept, if bounded.
    pub(super) fn capacity(&self) -> Option<u64> {
        match self {
            Entries::Bounded(cache) => cache.policy().max_capacity(),
            Entries::Unbounded(_) => None,
        }
    }

    pub(super) fn get(&self, key: &str) -> Option<Arc<Stored>> {
        match self {
            Entries::Bounded(cache) => cache.get(key),
            Entries::Unbounded(u) => u.map.get(key).map(|entry| Arc::clone(&entry)),
        }
    }

    /// Inserts (or replaces) an entry; returns whether an unbounded map is
    /// due a sweep (see [`Entries::purge_expired`]).
    #[must_use]
    pub(super) fn insert(&self, key: String, stored: Stored) -> bool {
        match self {
            Entries::Bounded(cache) => {
                cache.insert(key, Arc::new(stored));
                false
            }
            Entries::Unbounded(u) => {
                u.map.insert(key, Arc::new(stored));
                let writes = u.writes_since_sweep.fetch_add(1, Ordering::Relaxed) + 1;
                // Sweep once the writes since the last sweep outnumber what
                // it left (and 1,024): the map stays within about twice its
                // live size, at an amortized constant cost per write.
                writes > u.swept_len.load(Ordering::Relaxed).max(1024)
                    && !u.sweeping.swap(true, Ordering::AcqRel)
            }
        }
    }

    pub(super) fn remove(&self, key: &str) {
        match self {
            Entries::Bounded(cache) => cache.invalidate(key),
            Entries::Unbounded(u) => {
                u.map.remove(key);
            }
        }
    }

    /// Removes every entry whose key starts with `prefix`.
    pub(super) fn remove_prefix(&self, prefix: &str) {
        match self {
            Entries::Bounded(cache) => {
                for (key, _) in cache.iter() {
                    if key.starts_with(prefix) {
                        cache.invalidate(key.as_str());
                    }
                }
            }
            Entries::Unbounded(u) => u.map.retain(|key, _| !key.starts_with(prefix)),
        }
    }

    /// Drops every entry expired at `now`; returns how many were dropped.
    pub(super) fn purge_expired(&self, now: Instant) -> usize {
        match self {
            Entries::Bounded(cache) => {
                let mut dropped = 0;
                for (key, entry) in cache.iter() {
                    if entry.expires_at <= now {
                        cache.invalidate(key.as_str());
                        dropped += 1;
                    }
                }
                dropped
            }
            Entries::Unbounded(u) => {
                u.writes_since_sweep.store(0, Ordering::Relaxed);
                let before = u.map.len();
                u.map.retain(|_, entry| entry.expires_at > now);
                let after = u.map.len();
                u.swept_len.store(after, Ordering::Relaxed);
                u.sweeping.store(false, Ordering::Release);
                before.saturating_sub(after)
            }
        }
    }

    /// The number of entries held, fresh or expired.
    pub(super) fn len(&self) -> usize {
        match self {
            Entries::Bounded(cache) => {
                cache.run_pending_tasks();
                usize::try_from(cache.entry_count()).unwrap_or(usize::MAX)
            }
            Entries::Unbounded(u) => u.map.len(),
        }
    }
}
