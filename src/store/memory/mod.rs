//! [`MemoryStore`]: the embedded store, for one process.

use std::any::Any;
use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use dashmap::DashMap;
use tokio::sync::{broadcast, Notify};
use tokio::time::Instant;

use super::{lock_id, Fill, Filled, Lookup, Store};
use crate::{BatchFetch, Error, Invalidation, StoreEvent};

mod entries;
mod locks;

use entries::{Entries, Stored};
use locks::KeyLocks;

/// The entries [`MemoryStore::new`] keeps at most: 100,000.
pub const DEFAULT_CAPACITY: u64 = 100_000;

/// The embedded store: entries in process memory, per-key locks and leases
/// in process.
///
/// It follows the same protocol as a shared store: values expire after the
/// cache's TTL, negative entries after the negative TTL, and a fill *claims*
/// its keys: under the keys' locks (taken in ascending lock-id order, and
/// held for the claim alone) it re-reads them and leases those still
/// missing and not leased by a live holder. It calls the provider for the
/// leased keys holding no lock, and publishes a value only where its lease
/// is still its own (an invalidation, a write or a compare-and-set revokes
/// it; the fill then claims the key again, and what it fetched is delivered
/// to nobody). A key leased by another fill is waited for until that fill
/// publishes or releases it; a lease past its expiry (a holder that hung)
/// is taken over. Leases are renewed while their fetch runs. Caches that
/// share one `MemoryStore` (it is cheap to clone; clones share the entries)
/// therefore fetch each key once per TTL between them.
///
/// Entries are kept per `(namespace, key)` with the key's `Display` form, as
/// a shared store keeps them. An entry whose value has another type than the
/// reading cache's `Value` (two providers given one namespace) reads as
/// [`Lookup::Undecodable`]: a miss, fetched again and overwritten.
///
/// # Capacity
///
/// [`MemoryStore::new`] keeps at most [`DEFAULT_CAPACITY`] entries,
/// [`MemoryStore::with_capacity`] as many as you say: past it, the entries
/// least likely to be asked again are evicted (moka's TinyLFU), and an
/// evicted entry is a miss, filled again under a lease. Leases, locks and
/// versions are kept apart from the entries, so eviction never weakens
/// fill exclusion or lets a version go back. [`MemoryStore::unbounded`]
/// keeps every entry until it expires: only for a key space known to be
/// small.
///
/// Expiry uses [`tokio::time::Instant`], so tests with paused time can
/// advance past a TTL. Expired entries are not dropped at their expiry
/// (a cache may still serve them within its stale grace): they are
/// overwritten on the next fill, evicted as the least used (bounded), or
/// swept on a task of their own whenever the writes since the last sweep
/// outnumber the entries that sweep left (unbounded);
/// [`purge_expired`](MemoryStore::purge_expired) drops them on demand.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    entries: Entries,
    /// The last version given out; versions only grow, store-wide.
    versions: AtomicU64,
    locks: KeyLocks,
    /// Per namespace: fills and key invalidations hold it shared, a
    /// namespace invalidation exclusively.
    namespaces: DashMap<String, Arc<tokio::sync::RwLock<()>>>,
    /// Invalidation events, in process.
    events: broadcast::Sender<StoreEvent>,
    /// Live leases by entry key. Publishes, releases, invalidations and
    /// claims change leases and entries under this lock.
    leases: Mutex<HashMap<String, Leased>>,
    /// The last lease token given out.
    tokens: AtomicU64,
    /// Notified when leases end (published, released or revoked).
    lease_ended: Notify,
}

/// A key's lease: whose it is and until when.
struct Leased {
    token: u64,
    until: Instant,
}

impl Inner {
    fn new(entries: Entries) -> Self {
        Inner {
            entries,
            versions: AtomicU64::new(0),
            locks: KeyLocks::default(),
            namespaces: DashMap::new(),
            events: broadcast::channel(1024).0,
            leases: Mutex::new(HashMap::new()),
            tokens: AtomicU64::new(0),
            lease_ended: Notify::new(),
        }
    }
}

impl Default for MemoryStore {
    /// [`MemoryStore::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store of at most [`DEFAULT_CAPACITY`] entries.
    pub fn new() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }

    /// An empty store of at most `capacity` entries (values and negative
    /// entries alike); past it, the entries least likely to be asked again
    /// are evicted (TinyLFU). See "Capacity" above.
    pub fn with_capacity(capacity: u64) -> Self {
        MemoryStore {
            inner: Arc::new(Inner::new(Entries::bounded(capacity))),
        }
    }

    /// An empty store without a bound: every entry stays until it expires
    /// and is swept. Memory grows with the distinct keys loaded per TTL;
    /// prefer [`with_capacity`](Self::with_capacity) unless that number is
    /// known to be small.
    pub fn unbounded() -> Self {
        MemoryStore {
            inner: Arc::new(Inner::new(Entries::unbounded())),
        }
    }

    /// The most entries this store keeps; `None` when unbounded.
    pub fn capacity(&self) -> Option<u64> {
        self.inner.entries.capacity()
    }

    /// The number of entries held, fresh or expired, negative ones included.
    pub fn len(&self) -> usize {
        self.inner.entries.len()
    }

    /// Whether the store holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every expired entry now; returns how many were dropped.
    pub fn purge_expired(&self) -> usize {
        self.inner.entries.purge_expired(Instant::now())
    }

    /// Inserts an entry, sweeping expired ones on a task of their own when
    /// an unbounded map is due (inline outside a runtime).
    fn put(&self, entry_key: String, stored: Stored) {
        if self.inner.entries.insert(entry_key, stored) {
            let inner = Arc::clone(&self.inner);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        inner.entries.purge_expired(Instant::now());
                    });
                }
                Err(_) => {
                    inner.entries.purge_expired(Instant::now());
                }
            }
        }
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
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryStore")
            .field("entries", &self.inner.entries.len())
            .field("capacity", &self.inner.entries.capacity())
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
        {
            let mut leases = self.leases();
            leases.retain(|key, _| !key.starts_with(&prefix));
            self.inner.entries.remove_prefix(&prefix);
        }
        self.inner.lease_ended.notify_waiters();
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
        {
            let mut leases = self.leases();
            leases.remove(&entry_key);
            self.put(entry_key, stored);
        }
        self.inner.lease_ended.notify_waiters();
        let _ = self
            .inner
            .events
            .send(StoreEvent::new(namespace, Invalidation::Keys(vec![text])));
        Ok(version)
    }
}

/// What a claim found for one key.
enum Claimed<V> {
    /// A fresh entry (a value or a negative one).
    Found(Option<crate::Entry<V>>),
    /// Leased by this claim.
    Leased,
    /// Leased by a live holder, until then.
    Busy(Instant),
}

/// A lease's margin over the longest its fetch may take (no round trips in
/// process: only the scheduling of the renewal).
const LEASE_MARGIN: Duration = Duration::from_millis(100);

/// Claims one fill makes before it gives up with [`Error::Contended`].
const MAX_ROUNDS: u32 = 64;

/// How many times one fill accepts losing its leases (revoked by
/// invalidations while it fetched) before it fails with
/// [`Error::Contended`].
const MAX_REVOKED: u32 = 8;

impl MemoryStore {
    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Leased>> {
        self.inner.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fill, or with `try_only` a refresh that gives up (`None`) when a
    /// key's lock is taken, or a key is found or leased by another fill. A
    /// fill that fails after some keys were published (or found) answers
    /// those and fails only the rest, each [`Filled::Failed`].
    async fn fill_inner<F: BatchFetch>(
        &self,
        fill: Fill<'_, F>,
        try_only: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..fill.keys().len()).map(|_| None).collect();
        let rounds = self.fill_rounds(&fill, try_only, &mut answers).await;
        super::fill_answers(rounds, answers, try_only)
    }

    /// The rounds of a fill, answering into `answers` as keys settle;
    /// `Ok(false)` when a `try_only` fill gave up.
    async fn fill_rounds<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        try_only: bool,
        answers: &mut [Option<Filled<F::Value>>],
    ) -> Result<bool, Error> {
        let namespace = fill.namespace();
        let entry_keys: Vec<String> = fill
            .keys()
            .iter()
            .map(|key| entry_key(namespace, key))
            .collect();
        let mut pending: Vec<usize> = (0..entry_keys.len()).collect();
        let mut revoked_rounds = 0;
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return Ok(true);
            }
            // Registered before the claim looks, so that a lease ending in
            // between is not missed.
            let ended = self.inner.lease_ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            let lease = super::lease_covering(fill.fetch_bound(pending.len()), LEASE_MARGIN);
            let Some(claimed) = self
                .claim::<F>(fill, &entry_keys, &pending, lease, try_only)
                .await
            else {
                return Ok(false);
            };
            let (token, claimed) = claimed;
            let mut leased = Vec::new();
            let mut busy_until: Option<Instant> = None;
            let mut next = Vec::new();
            for (&i, claimed) in pending.iter().zip(claimed) {
                match claimed {
                    Claimed::Found(entry) => answers[i] = Some(Filled::Stored(entry)),
                    Claimed::Leased => leased.push(i),
                    Claimed::Busy(until) => {
                        busy_until = Some(busy_until.map_or(until, |b| b.min(until)));
                        next.push(i);
                    }
                }
            }
            let busy = next.len();
            let held = HeldLeases {
                store: self,
                token,
                keys: leased.iter().map(|&i| entry_keys[i].clone()).collect(),
            };
            if try_only && (leased.len() < pending.len()) {
                return Ok(false);
            }
            if !leased.is_empty() {
                let lost = self
                    .fetch_and_publish(fill, &entry_keys, &leased, held, lease, answers)
                    .await?;
                if !lost.is_empty() {
                    fill.record_revoked(lost.len());
                    revoked_rounds += 1;
                    if revoked_rounds > MAX_REVOKED {
                        return Err(Error::Contended {
                            namespace: namespace.into(),
                            keys: lost.len() + next.len(),
                            rounds: revoked_rounds,
                        });
                    }
                    next.extend(lost);
                }
            }
            if let Some(until) = busy_until {
                fill.record_lease_wait(busy);
                // Until a lease ends, or the first one expires (its holder
                // hung: the next claim takes it over).
                tokio::select! {
                    () = ended => {}
                    () = tokio::time::sleep_until(until) => {}
                }
            }
            next.sort_unstable();
            pending = next;
        }
        Err(Error::Contended {
            namespace: namespace.into(),
            keys: pending.len(),
            rounds: MAX_ROUNDS,
        })
    }

    /// Claims the keys at `pending`: under their locks (and their
    /// namespace's, shared), each is found fresh, found leased by a live
    /// holder, or leased for `lease` with a new token. `None` when
    /// `try_only` and a lock is taken.
    async fn claim<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        entry_keys: &[String],
        pending: &[usize],
        lease: Duration,
        try_only: bool,
    ) -> Option<(u64, Vec<Claimed<F::Value>>)> {
        let namespace = fill.namespace();
        // The key's text is the entry key's tail.
        let prefix = entry_key(namespace, &"").len();
        let ids = pending
            .iter()
            .map(|&i| lock_id(namespace, &entry_keys[i][prefix..]))
            .collect();
        let started = std::time::Instant::now();
        let namespace_lock = self.namespace_lock(namespace);
        let _shared = if try_only {
            namespace_lock.try_read_owned().ok()?
        } else {
            namespace_lock.read_owned().await
        };
        let _held = if try_only {
            self.inner.locks.try_lock_all(ids)?
        } else {
            self.inner.locks.lock_all(ids).await
        };
        fill.record_lock_wait(started.elapsed());
        let token = self.inner.tokens.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        let until = now.checked_add(lease).unwrap_or(far_future(now));
        let mut taken_over = 0;
        let mut found = Vec::new();
        let claimed = {
            let mut leases = self.leases();
            pending
                .iter()
                .map(|&i| {
                    let key = &entry_keys[i];
                    match self.lookup(key, now, Duration::ZERO) {
                        Lookup::Hit(entry) => {
                            found.push(i);
                            return Claimed::Found(Some(entry));
                        }
                        Lookup::NegativeHit => {
                            found.push(i);
                            return Claimed::Found(None);
                        }
                        _ => {}
                    }
                    match leases.get(key) {
                        Some(live) if live.until > now => Claimed::Busy(live.until),
                        other => {
                            taken_over += usize::from(other.is_some());
                            leases.insert(key.clone(), Leased { token, until });
                            Claimed::Leased
                        }
                    }
                })
                .collect()
        };
        fill.record_takeovers(taken_over);
        // Before the locks go: a load joining from now on reads the store.
        fill.about_to_commit(&found);
        Some((token, claimed))
    }

    /// Calls the provider for the keys at `leased`, renewing their leases
    /// meanwhile, and publishes what it answered where the leases are still
    /// `held`'s; returns the keys whose lease was revoked (nothing written,
    /// nothing delivered).
    async fn fetch_and_publish<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        entry_keys: &[String],
        leased: &[usize],
        mut held: HeldLeases<'_>,
        lease: Duration,
        answers: &mut [Option<Filled<F::Value>>],
    ) -> Result<Vec<usize>, Error> {
        let keys: Vec<F::Key> = leased.iter().map(|&i| fill.keys()[i].clone()).collect();
        let renewal = async {
            loop {
                tokio::time::sleep(lease / 2).await;
                let until = Instant::now() + lease;
                let mut leases = self.leases();
                for key in &held.keys {
                    if let Some(mine) = leases.get_mut(key).filter(|l| l.token == held.token) {
                        mine.until = until;
                    }
                }
            }
        };
        // A failed fetch (or a cancelled fill) drops `held`, which releases
        // the leases at once.
        let fetched = tokio::select! {
            fetched = fill.fetch_each(&keys) => fetched?,
            never = renewal => never,
        };
        let (mut fetched, mut failed) = crate::store::split_failed(fetched);
        fill.about_to_commit(leased);
        let mut lost = Vec::new();
        {
            let mut leases = self.leases();
            for (&i, key) in leased.iter().zip(&keys) {
                let entry_key = &entry_keys[i];
                if leases.get(entry_key).is_none_or(|l| l.token != held.token) {
                    lost.push(i);
                    continue;
                }
                leases.remove(entry_key);
                if let Some(err) = failed.remove(key) {
                    // Failed alone: answered with its error, nothing
                    // stored, its lease given up with the others.
                    answers[i] = Some(Filled::Failed(err));
                    continue;
                }
                let value = fetched.remove(key);
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
                self.put(entry_key.clone(), stored);
                answers[i] = Some(Filled::Fetched(entry));
            }
        }
        // Published or lost to another: nothing left to release.
        held.keys.clear();
        self.inner.lease_ended.notify_waiters();
        Ok(lost)
    }
}

/// The leases a fill took with `token`; dropped, it releases those still
/// its own (after a publish, none are) and wakes their waiters.
struct HeldLeases<'a> {
    store: &'a MemoryStore,
    token: u64,
    keys: Vec<String>,
}

impl Drop for HeldLeases<'_> {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut released = false;
        {
            let mut leases = self.store.leases();
            for key in &self.keys {
                if leases.get(key).is_some_and(|l| l.token == self.token) {
                    leases.remove(key);
                    released = true;
                }
            }
        }
        if released {
            self.store.inner.lease_ended.notify_waiters();
        }
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
        {
            let mut leases = self.leases();
            for key in &keys {
                let entry_key = entry_key(namespace, key);
                leases.remove(&entry_key);
                self.inner.entries.remove(&entry_key);
            }
        }
        self.inner.lease_ended.notify_waiters();
        // Nobody listening is not an error.
        let _ = self
            .inner
            .events
            .send(StoreEvent::new(namespace, Invalidation::Keys(keys)));
    }
}
