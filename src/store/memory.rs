//! [`MemoryStore`]: the embedded store, for one process.

use std::any::Any;
use std::collections::HashSet;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

use super::{lock_id, Fill, Filled, Lookup, Store};
use crate::{BatchFetch, Error, Invalidation, StoreEvent};

/// The embedded store: entries in process memory, per-key locks in process.
///
/// It follows the same protocol as a shared store: values expire after the
/// cache's TTL, negative entries after the negative TTL, and a fill takes the
/// keys' locks (in ascending lock-id order), re-reads, and only then calls the
/// provider for what is still missing. Caches that share one `MemoryStore`
/// (it is cheap to clone; clones share the entries) therefore fetch each key
/// once per TTL between them.
///
/// Entries are kept per `(namespace, key)` with the key's `Display` form, as
/// a shared store keeps them. An entry whose value has another type than the
/// reading cache's `Value` (two providers given one namespace) reads as
/// [`Lookup::Undecodable`]: a miss, fetched again and overwritten.
///
/// Expiry uses [`tokio::time::Instant`], so tests with paused time can
/// advance past a TTL. Expired entries are dropped lazily: overwritten on the
/// next fill, and swept whenever the writes since the last sweep outnumber the
/// entries that sweep left; [`purge_expired`](MemoryStore::purge_expired) sweeps on demand.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: DashMap<String, Stored>,
    /// The last version given out; versions only grow, store-wide.
    versions: AtomicU64,
    locks: KeyLocks,
    writes_since_sweep: AtomicUsize,
    /// Entries left by the last sweep.
    swept_len: AtomicUsize,
    /// Per namespace: fills and key invalidations hold it shared, a
    /// namespace invalidation exclusively.
    namespaces: DashMap<String, Arc<tokio::sync::RwLock<()>>>,
    /// Invalidation events, in process.
    events: broadcast::Sender<StoreEvent>,
}

impl Default for Inner {
    fn default() -> Self {
        Inner {
            entries: DashMap::new(),
            versions: AtomicU64::new(0),
            locks: KeyLocks::default(),
            writes_since_sweep: AtomicUsize::new(0),
            swept_len: AtomicUsize::new(0),
            namespaces: DashMap::new(),
            events: broadcast::channel(1024).0,
        }
    }
}

struct Stored {
    /// `None` is a negative entry.
    value: Option<Arc<dyn Any + Send + Sync>>,
    /// Freshness, on tokio's clock (paused-time tests move it).
    expires_at: Instant,
    version: u64,
    fetched_at: SystemTime,
    expires_wall: SystemTime,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of entries held, fresh or expired, negative ones included.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.inner.entries.is_empty()
    }

    /// Drops every expired entry now; returns how many were dropped.
    pub fn purge_expired(&self) -> usize {
        self.inner.writes_since_sweep.store(0, Ordering::Relaxed);
        let now = Instant::now();
        let before = self.inner.entries.len();
        self.inner.entries.retain(|_, entry| entry.expires_at > now);
        let after = self.inner.entries.len();
        self.inner.swept_len.store(after, Ordering::Relaxed);
        before.saturating_sub(after)
    }

    fn lookup<V: Clone + 'static>(
        &self,
        entry_key: &str,
        now: Instant,
        grace: Duration,
    ) -> Lookup<V> {
        let Some(entry) = self.inner.entries.get(entry_key) else {
            return Lookup::Miss;
        };
        if entry.expires_at <= now {
            let within_grace = entry
                .expires_at
                .checked_add(grace)
                .is_some_and(|end| end > now);
            return match (&entry.value, within_grace) {
                (Some(value), true) => match value.downcast_ref::<V>() {
                    Some(value) => Lookup::Stale(crate::Entry::new(
                        value.clone(),
                        entry.version,
                        entry.fetched_at,
                        entry.expires_wall,
                    )),
                    None => Lookup::Miss,
                },
                _ => Lookup::Miss,
            };
        }
        match &entry.value {
            None => Lookup::NegativeHit,
            Some(value) => match value.downcast_ref::<V>() {
                Some(value) => Lookup::Hit(crate::Entry::new(
                    value.clone(),
                    entry.version,
                    entry.fetched_at,
                    entry.expires_wall,
                )),
                None => Lookup::Undecodable,
            },
        }
    }

    fn note_writes(&self, n: usize) {
        let writes = self
            .inner
            .writes_since_sweep
            .fetch_add(n, Ordering::Relaxed)
            + n;
        // Sweep once the writes since the last sweep outnumber what it left
        // (and 1,024): the map stays within about twice its live size, at an
        // amortized constant cost per write.
        if writes > self.inner.swept_len.load(Ordering::Relaxed).max(1024) {
            self.purge_expired();
        }
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.entries.len())
            .finish_non_exhaustive()
    }
}

/// An instant no cache will live to see, for TTLs past the clock's range.
fn far_future(now: Instant) -> Instant {
    now + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// The map key of `(namespace, key)`: the namespace's length first, so no two
/// pairs map to the same string.
fn entry_key(namespace: &str, key: &impl fmt::Display) -> String {
    let mut out = String::with_capacity(namespace.len() + 24);
    let _ = write!(out, "{}:{namespace}{key}", namespace.len());
    out
}

#[async_trait::async_trait]
impl<F: BatchFetch> Store<F> for MemoryStore {
    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        let now = Instant::now();
        Ok(keys
            .iter()
            .map(|key| self.lookup(&entry_key(namespace, key), now, grace))
            .collect())
    }

    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error> {
        let answers = self.fill_inner(fill, false).await?;
        Ok(answers.unwrap_or_default())
    }

    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        self.fill_inner(fill, true).await
    }

    async fn invalidate(&self, namespace: &str, keys: &[F::Key]) -> Result<(), Error> {
        let keys = keys.iter().map(ToString::to_string).collect();
        self.remove_locked(namespace, keys, None).await;
        Ok(())
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        Some(self.inner.events.subscribe())
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        let _all = self.namespace_lock(namespace).write_owned().await;
        let prefix = entry_key(namespace, &"");
        self.inner
            .entries
            .retain(|key, _| !key.starts_with(&prefix));
        let _ = self
            .inner
            .events
            .send(StoreEvent::new(namespace, Invalidation::Namespace));
        Ok(())
    }

    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[F::Key],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error> {
        let keys = keys.iter().map(ToString::to_string).collect();
        self.remove_locked(namespace, keys, Some(work)).await;
        Ok(())
    }

    async fn put_if_version(
        &self,
        namespace: &str,
        key: &F::Key,
        expected: u64,
        value: F::Value,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let text = key.to_string();
        let _shared = self.namespace_lock(namespace).read_owned().await;
        let _held = self
            .inner
            .locks
            .lock_all(vec![lock_id(namespace, &text)])
            .await;
        let entry_key = entry_key(namespace, &text);
        let actual = self.inner.entries.get(&entry_key).map(|e| e.version);
        if actual != Some(expected) {
            return Err(Error::VersionMismatch {
                namespace: namespace.into(),
                key: text.into(),
                expected,
                actual,
            });
        }
        let stored = self.stored(Some(value), ttl);
        let version = stored.version;
        self.inner.entries.insert(entry_key, stored);
        let _ = self
            .inner
            .events
            .send(StoreEvent::new(namespace, Invalidation::Keys(vec![text])));
        Ok(version)
    }
}

impl MemoryStore {
    /// A fill, or with `try_only` a refresh that gives up (`None`) when a
    /// key's lock is taken.
    async fn fill_inner<F: BatchFetch>(
        &self,
        fill: Fill<'_, F>,
        try_only: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let namespace = fill.namespace();
        let entry_keys: Vec<String> = fill
            .keys()
            .iter()
            .map(|key| entry_key(namespace, key))
            .collect();
        // The key's text is the entry key's tail.
        let prefix = entry_key(namespace, &"").len();
        let ids = entry_keys
            .iter()
            .map(|k| lock_id(namespace, &k[prefix..]))
            .collect();
        let started = std::time::Instant::now();
        let namespace_lock = self.namespace_lock(namespace);
        let _shared = if try_only {
            match namespace_lock.try_read_owned() {
                Ok(shared) => shared,
                Err(_) => return Ok(None),
            }
        } else {
            namespace_lock.read_owned().await
        };
        let _held = if try_only {
            match self.inner.locks.try_lock_all(ids) {
                Some(held) => held,
                None => return Ok(None),
            }
        } else {
            self.inner.locks.lock_all(ids).await
        };
        fill.record_lock_wait(started.elapsed());

        // Re-read: another fill may have written while we waited.
        let now = Instant::now();
        let mut answers: Vec<Filled<F::Value>> = Vec::with_capacity(entry_keys.len());
        let mut missing = Vec::new();
        for (i, entry_key) in entry_keys.iter().enumerate() {
            answers.push(match self.lookup(entry_key, now, Duration::ZERO) {
                Lookup::Hit(value) => Filled::Stored(Some(value)),
                Lookup::NegativeHit => Filled::Stored(None),
                _ => {
                    missing.push(i);
                    // Replaced below by what the provider answers.
                    Filled::Fetched(None)
                }
            });
        }
        let all: Vec<usize> = (0..answers.len()).collect();
        if missing.is_empty() {
            fill.about_to_commit(&all);
            return Ok(Some(answers));
        }

        let missing_keys: Vec<F::Key> = missing.iter().map(|&i| fill.keys()[i].clone()).collect();
        let mut fetched = fill.fetch(&missing_keys).await?;
        for (&i, key) in missing.iter().zip(missing_keys) {
            let value = fetched.remove(&key);
            let ttl = if value.is_some() {
                fill.ttl()
            } else {
                fill.negative_ttl()
            };
            let stored = self.stored(value.clone(), ttl);
            let entry = value.map(|value| {
                crate::Entry::new(
                    value,
                    stored.version,
                    stored.fetched_at,
                    stored.expires_wall,
                )
            });
            self.inner.entries.insert(entry_keys[i].clone(), stored);
            answers[i] = Filled::Fetched(entry);
        }
        self.note_writes(missing.len());
        // The locks are released when `_held` drops, on return.
        fill.about_to_commit(&all);
        Ok(Some(answers))
    }
}

impl MemoryStore {
    fn namespace_lock(&self, namespace: &str) -> Arc<tokio::sync::RwLock<()>> {
        Arc::clone(
            self.inner
                .namespaces
                .entry(namespace.to_owned())
                .or_default()
                .value(),
        )
    }

    /// A new entry of `value` (or a negative one) fresh for `ttl`, with the
    /// next version.
    fn stored<V: Send + Sync + 'static>(&self, value: Option<V>, ttl: Duration) -> Stored {
        let now = Instant::now();
        let wall = SystemTime::now();
        Stored {
            value: value.map(|v| Arc::new(v) as Arc<dyn Any + Send + Sync>),
            expires_at: now.checked_add(ttl).unwrap_or(far_future(now)),
            version: self.inner.versions.fetch_add(1, Ordering::Relaxed) + 1,
            fetched_at: wall,
            expires_wall: wall.checked_add(ttl).unwrap_or(wall),
        }
    }

    /// Under the keys' locks (and their namespace's, shared): runs `work`,
    /// if any, then removes the keys' entries and announces it.
    async fn remove_locked(
        &self,
        namespace: &str,
        keys: Vec<String>,
        work: Option<futures::future::BoxFuture<'_, ()>>,
    ) {
        let _shared = self.namespace_lock(namespace).read_owned().await;
        let ids = keys.iter().map(|key| lock_id(namespace, key)).collect();
        let _held = self.inner.locks.lock_all(ids).await;
        if let Some(work) = work {
            work.await;
        }
        for key in &keys {
            self.inner.entries.remove(&entry_key(namespace, key));
        }
        // Nobody listening is not an error.
        let _ = self
            .inner
            .events
            .send(StoreEvent::new(namespace, Invalidation::Keys(keys)));
    }
}

/// Per-key exclusive locks: the set of lock ids held, and one notification
/// for every release. Taking a batch's locks costs one mutex acquisition
/// when they are free; a waiter wakes on each release and tries again.
#[derive(Default)]
struct KeyLocks {
    held: Mutex<HashSet<i64>>,
    released: Notify,
}

impl KeyLocks {
    /// Takes the locks of `ids` in ascending order (so two callers never
    /// deadlock: whoever waits holds only lower ids than the one it waits
    /// for). Cancel safe: whatever was taken is released on drop.
    async fn lock_all(&self, mut ids: Vec<i64>) -> HeldLocks<'_> {
        ids.sort_unstable();
        ids.dedup();
        let mut held = HeldLocks {
            owner: self,
            ids: Vec::with_capacity(ids.len()),
        };
        let mut next = 0;
        loop {
            // Registered before looking, so a release in between is not
            // missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            {
                let mut set = self.held.lock().unwrap_or_else(|e| e.into_inner());
                while next < ids.len() && set.insert(ids[next]) {
                    held.ids.push(ids[next]);
                    next += 1;
                }
            }
            if next == ids.len() {
                return held;
            }
            released.await;
        }
    }
}

impl KeyLocks {
    /// Takes the locks of `ids` if every one is free, at once; `None`
    /// (holding nothing) otherwise.
    fn try_lock_all(&self, mut ids: Vec<i64>) -> Option<HeldLocks<'_>> {
        ids.sort_unstable();
        ids.dedup();
        let mut set = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if ids.iter().any(|id| set.contains(id)) {
            return None;
        }
        set.extend(ids.iter().copied());
        drop(set);
        Some(HeldLocks { owner: self, ids })
    }
}

/// The locks one fill holds; released on drop.
struct HeldLocks<'a> {
    owner: &'a KeyLocks,
    ids: Vec<i64>,
}

impl Drop for HeldLocks<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        {
            let mut set = self.owner.held.lock().unwrap_or_else(|e| e.into_inner());
            for id in &self.ids {
                set.remove(id);
            }
        }
        self.owner.released.notify_waiters();
    }
}
