//! [`ShardedStore`]: several stores, typically `PgStore`s on separate
//! Postgres servers, behind one; each key lives on one of them (the
//! guarantees are on the type).

use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::broadcast;

use super::{display_lock_id, namespace_lock_id, Fill, Filled, Lookup, Store};
use crate::{BatchFetch, Error, Invalidation, StoreEvent};

/// One store of a [`ShardedStore`], by name.
#[derive(Debug)]
struct Shard<S> {
    name: Arc<str>,
    store: S,
}

/// Several stores behind one: each key routes by a stable hash of
/// `(namespace, key)` to one shard.
///
/// # Guarantees
///
/// * **Per-key guarantees unchanged.** A key routes by a stable hash of
///   `(namespace, key)` to one shard, so its row, its lock or lease and its
///   invalidation all live on that shard, and every guarantee a shard gives
///   a key (exactly-once fills, invalidation binding later loads) holds as
///   it does on one store. With [`route_by_namespace`], a namespace routes
///   as a whole (for shards in `LockMode::Namespace`, whose lock is the
///   namespace's).
/// * **Stable routing, few keys moved.** Routing is jump consistent hashing
///   (Lamping and Veach) of the key's 64-bit lock id, a pure function of
///   the key and the shard count: every instance of every version routes
///   alike. Going from `n` to `n + 1` shards moves about `1 / (n + 1)` of
///   the keys, all to the new shard; a moved key is a miss once (filled
///   again on its new shard), and its old row is left to expire.
/// * **Failures scoped to their shard.** A shard that fails (down,
///   unreachable) fails only the loads of its keys, with an
///   [`Error::Store`] naming the shard; the other keys of the same batch
///   are answered.
/// * **Everywhere where it must be.** `invalidate_namespace` and
///   [`migrate`](ShardedStore::migrate) reach every shard; the shards'
///   event streams are merged into one.
///
/// [`route_by_namespace`]: ShardedStore::route_by_namespace
///
/// ```no_run
/// # #[cfg(feature = "postgres")]
/// # async fn run() -> Result<(), loadlock::Error> {
/// use loadlock::store::ShardedStore;
/// use loadlock::PgStore;
///
/// let store = ShardedStore::new([
///     ("pg-a", PgStore::connect("postgres://app@pg-a/app").await?),
///     ("pg-b", PgStore::connect("postgres://app@pg-b/app").await?),
/// ])?;
/// store.migrate().await?; // every shard
/// # Ok(()) }
/// ```
///
/// Every instance must list the same shards in the same order: the order
/// is the routing. Add a shard at the end (moving about `1 / n` of the
/// keys); removing or reordering shards moves many more.
///
/// # Resharding
///
/// A moved key costs one miss: it is filled again on its new shard. Two
/// things need care while the shard list changes:
///
/// * Instances that still route with the old list fill and invalidate a
///   moved key on its old shard: until every instance has the new list, a
///   key may be fetched once per shard, and an invalidation through one
///   instance reaches only the shard it routes to. Roll the change out,
///   then call `invalidate_namespace` (it reaches every shard).
/// * A moved key's old row stays on its old shard until it expires. If the
///   key may move back (a shard removed again) within the TTL, invalidate
///   the namespace after that change too, or the old row would be served.
pub struct ShardedStore<S> {
    shards: Arc<[Shard<S>]>,
    by_namespace: bool,
    events: Arc<OnceLock<broadcast::Sender<StoreEvent>>>,
}

impl<S> Clone for ShardedStore<S> {
    fn clone(&self) -> Self {
        ShardedStore {
            shards: Arc::clone(&self.shards),
            by_namespace: self.by_namespace,
            events: Arc::clone(&self.events),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for ShardedStore<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardedStore")
            .field("shards", &self.shards)
            .field("by_namespace", &self.by_namespace)
            .finish_non_exhaustive()
    }
}

/// The bucket of `key` among `buckets` (jump consistent hashing).
fn jump(key: u64, buckets: usize) -> usize {
    let mut key = key;
    let (mut b, mut j) = (-1i64, 0i64);
    while j < buckets as i64 {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as usize
}

/// Spreads the bits of a lock id (FNV-1a's low bits are its weakest) before
/// it seeds the jump.
fn mix(id: i64) -> u64 {
    let mut z = (id as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `err` with the shard's name, when it is the shard's own failure (a
/// provider error, a version mismatch and the like pass unchanged).
fn on_shard(name: &str, err: Error) -> Error {
    match err {
        Error::Store { message, source } => Error::Store {
            message: format!("shard {name}: {message}").into(),
            source,
        },
        other => other,
    }
}

impl<S> ShardedStore<S> {
    /// Shards `(name, store)`, in routing order.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] without any shard, or when two shards share a
    /// name.
    pub fn new<N: Into<String>>(shards: impl IntoIterator<Item = (N, S)>) -> Result<Self, Error> {
        let shards: Vec<Shard<S>> = shards
            .into_iter()
            .map(|(name, store)| Shard {
                name: name.into().into(),
                store,
            })
            .collect();
        if shards.is_empty() {
            return Err(Error::config("a sharded store needs at least one shard"));
        }
        for (i, shard) in shards.iter().enumerate() {
            if shards[..i].iter().any(|s| s.name == shard.name) {
                return Err(Error::config(format!(
                    "two shards are named {:?}",
                    shard.name
                )));
            }
        }
        Ok(ShardedStore {
            shards: shards.into(),
            by_namespace: false,
            events: Arc::default(),
        })
    }

    /// Routes each namespace as a whole to one shard: for shards whose
    /// locks are the namespace's (`LockMode::Namespace`).
    #[must_use]
    pub fn route_by_namespace(mut self) -> Self {
        self.by_namespace = true;
        self
    }

    /// The index of the shard `key` of `namespace` lives on.
    pub fn shard_of(&self, namespace: &str, key: &dyn fmt::Display) -> usize {
        let id = if self.by_namespace {
            namespace_lock_id(namespace)
        } else {
            display_lock_id(namespace, key)
        };
        jump(mix(id), self.shards.len())
    }

    /// The shards' names, in routing order.
    pub fn shard_names(&self) -> impl Iterator<Item = &str> {
        self.shards.iter().map(|s| &*s.name)
    }

    /// The shards' stores, in routing order.
    pub fn stores(&self) -> impl Iterator<Item = &S> {
        self.shards.iter().map(|s| &s.store)
    }

    /// The indices of `keys`, grouped by shard (shards in order, keys in
    /// their order).
    fn groups<K: fmt::Display>(&self, namespace: &str, keys: &[K]) -> Vec<(usize, Vec<usize>)> {
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.shards.len()];
        for (i, key) in keys.iter().enumerate() {
            groups[self.shard_of(namespace, key)].push(i);
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.is_empty())
            .collect()
    }
}

#[cfg(feature = "postgres")]
impl ShardedStore<crate::PgStore> {
    /// Migrates every shard ([`PgStore::migrate`](crate::PgStore::migrate)),
    /// one after the other.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when a shard locks whole namespaces
    /// (`LockMode::Namespace`) but the store routes keys one by one (call
    /// [`route_by_namespace`](Self::route_by_namespace)): the namespace's
    /// fills would no longer serialize across shards. Otherwise the first
    /// shard's failure, naming it.
    pub async fn migrate(&self) -> Result<(), Error> {
        if let Some(shard) = self
            .shards
            .iter()
            .find(|s| s.store.lock_mode() == crate::LockMode::Namespace && !self.by_namespace)
        {
            return Err(Error::config(format!(
                "shard {} locks whole namespaces (LockMode::Namespace): route them whole \
                 with ShardedStore::route_by_namespace",
                shard.name
            )));
        }
        for shard in self.shards.iter() {
            shard
                .store
                .migrate()
                .await
                .map_err(|e| on_shard(&shard.name, e))?;
        }
        Ok(())
    }
}

impl<S> ShardedStore<S> {
    /// The part of `fill` whose keys are at `indices`.
    async fn fill_part<F: BatchFetch>(
        store: &S,
        fill: &Fill<'_, F>,
        indices: &[usize],
        refresh: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error>
    where
        S: Store<F>,
    {
        let keys: Vec<F::Key> = indices.iter().map(|&i| fill.keys[i].clone()).collect();
        let leave = |part: &[usize]| {
            let whole: Vec<usize> = part.iter().map(|&i| indices[i]).collect();
            (fill.leave)(&whole);
        };
        let part = Fill {
            namespace: fill.namespace,
            keys: &keys,
            ttl: fill.ttl,
            negative_ttl: fill.negative_ttl,
            provider: fill.provider,
            prepaid: fill.prepaid,
            counters: fill.counters,
            leave: &leave,
        };
        if refresh {
            store.refresh(part).await
        } else {
            store.fill(part).await.map(Some)
        }
    }

    /// Fills (or refreshes) each shard's part of `fill` at once; a shard
    /// that fails fails only its keys.
    async fn fill_all<F: BatchFetch>(
        &self,
        fill: Fill<'_, F>,
        refresh: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error>
    where
        S: Store<F>,
    {
        let groups = self.groups(fill.namespace, fill.keys);
        if let [(shard, _)] = groups.as_slice() {
            let shard = &self.shards[*shard];
            let answer = if refresh {
                shard.store.refresh(fill).await
            } else {
                shard.store.fill(fill).await.map(Some)
            };
            return answer.map_err(|e| on_shard(&shard.name, e));
        }
        let parts = futures::future::join_all(groups.iter().map(|(shard, indices)| {
            Self::fill_part(&self.shards[*shard].store, &fill, indices, refresh)
        }))
        .await;
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..fill.keys.len()).map(|_| None).collect();
        let mut gave_up = false;
        for ((shard, indices), part) in groups.iter().zip(parts) {
            match part {
                Ok(Some(filled)) => {
                    for (&i, answer) in indices.iter().zip(filled) {
                        answers[i] = Some(answer);
                    }
                }
                Ok(None) => gave_up = true,
                Err(err) => {
                    let err = on_shard(&self.shards[*shard].name, err);
                    for &i in indices {
                        answers[i] = Some(Filled::Failed(err.clone()));
                    }
                }
            }
        }
        if gave_up {
            return Ok(None);
        }
        Ok(Some(
            answers
                .into_iter()
                .map(|a| a.expect("every key is on a shard"))
                .collect(),
        ))
    }
}

#[async_trait::async_trait]
impl<F: BatchFetch, S: Store<F>> Store<F> for ShardedStore<S> {
    fn check_key(&self, key: &dyn fmt::Display) -> Result<(), String> {
        // Every shard must be able to keep it: it may route to any.
        self.shards.iter().try_for_each(|s| s.store.check_key(key))
    }

    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        let groups = self.groups(namespace, keys);
        if let [(shard, _)] = groups.as_slice() {
            let shard = &self.shards[*shard];
            return shard
                .store
                .get(namespace, keys, grace)
                .await
                .map_err(|e| on_shard(&shard.name, e));
        }
        let parts = futures::future::join_all(groups.iter().map(|(shard, indices)| {
            let part: Vec<F::Key> = indices.iter().map(|&i| keys[i].clone()).collect();
            async move { self.shards[*shard].store.get(namespace, &part, grace).await }
        }))
        .await;
        let mut lookups: Vec<Lookup<F::Value>> = (0..keys.len()).map(|_| Lookup::Miss).collect();
        for ((_, indices), part) in groups.iter().zip(parts) {
            // A shard that cannot be read leaves its keys misses: their
            // fill, on the same shard, then fails them alone.
            if let Ok(found) = part {
                for (&i, lookup) in indices.iter().zip(found) {
                    lookups[i] = lookup;
                }
            }
        }
        Ok(lookups)
    }

    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error> {
        self.fill_all(fill, false)
            .await
            .map(|answers| answers.expect("a fill never gives up"))
    }

    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        self.fill_all(fill, true).await
    }

    async fn invalidate(&self, namespace: &str, keys: &[F::Key]) -> Result<(), Error> {
        let groups = self.groups(namespace, keys);
        let done = futures::future::join_all(groups.iter().map(|(shard, indices)| {
            let part: Vec<F::Key> = indices.iter().map(|&i| keys[i].clone()).collect();
            let shard = &self.shards[*shard];
            async move {
                shard
                    .store
                    .invalidate(namespace, &part)
                    .await
                    .map_err(|e| on_shard(&shard.name, e))
            }
        }))
        .await;
        done.into_iter().collect()
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        let done = futures::future::join_all(self.shards.iter().map(|shard| async move {
            Store::<F>::invalidate_namespace(&shard.store, namespace)
                .await
                .map_err(|e| on_shard(&shard.name, e))
        }))
        .await;
        done.into_iter().collect()
    }

    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[F::Key],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error> {
        // Each involved shard's locks, taken in shard order (so that two
        // writes never wait for each other in opposite orders), nested: the
        // work runs once every lock is held.
        let groups = self.groups(namespace, keys);
        let parts: Vec<(usize, Vec<F::Key>)> = groups
            .iter()
            .map(|(shard, indices)| (*shard, indices.iter().map(|&i| keys[i].clone()).collect()))
            .collect();
        let inner_failure: Arc<Mutex<Option<Error>>> = Arc::default();
        let mut work = work;
        for (shard, part) in parts.iter().rev().skip(1) {
            let (shard, failure) = (&self.shards[*shard], Arc::clone(&inner_failure));
            let inner = work;
            work = Box::pin(async move {
                if let Err(err) = shard.store.write_locked(namespace, part, inner).await {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(on_shard(&shard.name, err));
                }
            });
        }
        let Some((first, part)) = parts.first() else {
            work.await;
            return Ok(());
        };
        let shard = &self.shards[*first];
        shard
            .store
            .write_locked(namespace, part, work)
            .await
            .map_err(|e| on_shard(&shard.name, e))?;
        let failure = inner_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        failure.map_or(Ok(()), Err)
    }

    async fn put_if_version(
        &self,
        namespace: &str,
        key: &F::Key,
        expected: u64,
        value: F::Value,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let shard = &self.shards[self.shard_of(namespace, key)];
        shard
            .store
            .put_if_version(namespace, key, expected, value, ttl)
            .await
            .map_err(|e| on_shard(&shard.name, e))
    }

    /// The shards' events, merged (started on the first call, which must be
    /// inside a tokio runtime). A shard's own lost connection comes through
    /// as its [`Invalidation::Missed`]; a merged stream that lags sends one
    /// too.
    fn subscribe(&self) -> Option<broadcast::Receiver<StoreEvent>> {
        if let Some(sender) = self.events.get() {
            return Some(sender.subscribe());
        }
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let sender = self.events.get_or_init(|| {
            let (sender, _) = broadcast::channel(1024);
            for shard in self.shards.iter() {
                let Some(mut events) = Store::<F>::subscribe(&shard.store) else {
                    continue;
                };
                let sender = sender.clone();
                runtime.spawn(async move {
                    loop {
                        match events.recv().await {
                            Ok(event) => {
                                let _ = sender.send(event);
                            }
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let _ = sender.send(StoreEvent::new("", Invalidation::Missed));
                            }
                            Err(broadcast::error::RecvError::Closed) => break,
                        }
                    }
                });
            }
            sender
        });
        Some(sender.subscribe())
    }

    fn fill_time_limit(&self) -> Option<Duration> {
        // The strictest shard's: the cache's provider timeout must fit them
        // all.
        self.shards
            .iter()
            .filter_map(|s| Store::<F>::fill_time_limit(&s.store))
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routed(store: &ShardedStore<()>, keys: std::ops::Range<u64>) -> Vec<usize> {
        keys.map(|k| store.shard_of("users/v1", &k)).collect()
    }

    #[test]
    fn routing_is_pinned() {
        // A change here moves keys between shards for every fleet: a
        // breaking change of the routing. Computed independently (FNV-1a of
        // the lock id, splitmix64's finalizer, then Lamping and Veach's jump,
        // in Python).
        let two = ShardedStore::new([("a", ()), ("b", ())]).unwrap();
        let three = ShardedStore::new([("a", ()), ("b", ()), ("c", ())]).unwrap();
        assert_eq!(
            routed(&two, 0..12),
            vec![0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1]
        );
        assert_eq!(
            routed(&three, 0..12),
            vec![2, 1, 2, 1, 1, 1, 1, 2, 2, 2, 1, 2]
        );
        assert_eq!(jump(0, 1), 0);
        assert_eq!(jump(u64::MAX, 7), jump(u64::MAX, 7));
    }

    #[test]
    fn a_third_shard_takes_a_third_of_the_keys_and_only_those_move() {
        let two = ShardedStore::new([("a", ()), ("b", ())]).unwrap();
        let three = ShardedStore::new([("a", ()), ("b", ()), ("c", ())]).unwrap();
        let before = routed(&two, 0..30_000);
        let after = routed(&three, 0..30_000);
        let moved: Vec<(usize, usize)> = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| b != a)
            .map(|(&b, &a)| (b, a))
            .collect();
        let share = moved.len() as f64 / 30_000.0;
        assert!((0.31..0.36).contains(&share), "{share}");
        assert!(
            moved.iter().all(|&(_, to)| to == 2),
            "keys move only to the new shard"
        );
        // Balanced: each of the three holds about a third.
        for shard in 0..3 {
            let held = after.iter().filter(|&&s| s == shard).count() as f64 / 30_000.0;
            assert!((0.31..0.36).contains(&held), "shard {shard}: {held}");
        }
    }

    #[test]
    fn a_namespace_routes_whole_when_asked() {
        let store = ShardedStore::new([("a", ()), ("b", ()), ("c", ())])
            .unwrap()
            .route_by_namespace();
        let shards: std::collections::HashSet<usize> =
            (0..100u64).map(|k| store.shard_of("ns", &k)).collect();
        assert_eq!(shards.len(), 1);
    }

    #[test]
    fn shards_are_named_once() {
        assert!(ShardedStore::<()>::new(Vec::<(&str, ())>::new()).is_err());
        let err = ShardedStore::new([("a", ()), ("a", ())]).unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");
    }
}
