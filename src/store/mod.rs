//! Tier 2: where loaded values are kept between requests, and the seam
//! between the in-process machinery and a shared store.
//!
//! A [`Store`] answers two questions for a [`Cache`](crate::Cache):
//!
//! 1. [`get`](Store::get) — which of these keys have a fresh entry? This is
//!    the optimistic read: no lock, no transaction.
//! 2. [`fill`](Store::fill) — for keys that were missing: take each key's
//!    exclusive lock (all of them, in ascending lock-id order so two fills
//!    cannot deadlock), look again (another instance may have filled some
//!    while this one waited), call the provider through
//!    [`Fill::fetch`] for only what is still missing, write the results —
//!    values and negative entries — and release the locks.
//!
//! Under that protocol a key is fetched from the provider once per TTL among
//! all caches sharing the store. [`MemoryStore`] implements it inside one
//! process; a shared database store implements the same contract across
//! processes.

mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
mod sharded;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use memory::{MemoryStore, DEFAULT_CAPACITY};
pub use sharded::ShardedStore;

use crate::caller::ProviderCaller;
use crate::limit::Prepaid;
use crate::stats::Counters;
use crate::{BatchFetch, Entry, Error, StoreEvent};

/// What the store holds for one key, as seen by [`Store::get`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Lookup<V> {
    /// A fresh value, with its version and times.
    Hit(Entry<V>),
    /// A fresh negative entry: the provider said it has no such resource.
    NegativeHit,
    /// Nothing fresh: absent or expired.
    Miss,
    /// An expired value still within the grace the read asked for
    /// (stale-while-revalidate / stale-if-error); never an invalidated one.
    Stale(Entry<V>),
    /// An entry exists but no longer decodes into the cache's `Value` (its
    /// shape changed): treated as a miss, fetched again and overwritten, and
    /// counted in [`Stats::undecodable`](crate::Stats::undecodable).
    Undecodable,
}

/// The answer for one key of a [`Store::fill`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Filled<V> {
    /// Found fresh in the store once the key's lock was held: someone else
    /// filled it while this fill waited. `None` is a negative entry.
    Stored(Option<Entry<V>>),
    /// Fetched from the provider by this fill and written to the store, with
    /// the version and times it was written with. `None` means the provider
    /// does not have it (a negative entry was written).
    Fetched(Option<Entry<V>>),
    /// Not filled: the part of the fill this key belonged to failed after
    /// other parts had written theirs (a fill of many keys runs in groups).
    /// Its loads fail with this error; nothing was written for it.
    Failed(crate::Error),
}

impl<V> Filled<V> {
    /// The entry, wherever it came from, or the error of a failed key.
    ///
    /// # Errors
    ///
    /// The error of [`Filled::Failed`].
    pub fn into_entry(self) -> Result<Option<Entry<V>>, crate::Error> {
        match self {
            Filled::Stored(entry) | Filled::Fetched(entry) => Ok(entry),
            Filled::Failed(err) => Err(err),
        }
    }
}

/// Where a [`Cache`](crate::Cache) keeps values between requests (tier 2).
///
/// See the [module documentation](self) for the protocol an implementation
/// must follow. The crate ships [`MemoryStore`]; implement this trait to keep
/// entries elsewhere. Implementations are shared by every loader of a cache,
/// and may be shared by several caches, whose entries are kept apart by
/// namespace.
///
/// # Obligations
///
/// The cache's guarantees hold only if the store keeps these; the
/// `testing` feature's `loadlock::testing::check_store` checks what can be
/// seen from outside.
///
/// * **Exactly once.** [`fill`](Store::fill) calls [`Fill::fetch`] only for
///   keys that are missing *under their lock or lease*: re-read after
///   taking it, and never fetch a key another holder is filling (wait for
///   its result, then read it).
/// * **Nothing stale written, nothing stale served.**
///   [`invalidate`](Store::invalidate) (and `write_locked`,
///   `put_if_version`, `invalidate_namespace`) serializes with fills of the
///   same keys and revokes the ones in progress: a fill that fetched before
///   the invalidation must not write its value after it. Once `invalidate`
///   returns, no [`get`](Store::get) returns the old entry, not even as
///   [`Lookup::Stale`].
/// * **Leave before visible.** Call [`Fill::about_to_commit`] for keys
///   right before their writes (or the values a re-read found) become
///   visible to others. Without it, loads of this process keep joining the
///   fill, and a load that starts after an invalidation returned may
///   receive a value read before it: the invalidation guarantee silently
///   weakens. No black-box check can see this; keep it.
/// * **Failures scoped.** Write nothing of a failed [`Fill::fetch`]. A fill
///   that fails after writing some keys answers those and marks the rest
///   [`Filled::Failed`]. Refuse keys the store cannot keep with
///   [`check_key`](Store::check_key), so they never fail a batch.
/// * **Bounded.** A shared store bounds how long a fill may hold keys
///   ([`fill_time_limit`](Store::fill_time_limit)); a holder that died must
///   not hold them for ever.
/// * **Events.** A store whose entries other processes can invalidate
///   announces every invalidation through [`subscribe`](Store::subscribe)
///   (a process-local tier relies on it to evict).
///
/// # Cancel safety
///
/// Both methods may be dropped at any await point (a batch whose runtime
/// shuts down). An implementation must then release every lock it holds and
/// write nothing half-done.
#[async_trait::async_trait]
pub trait Store<F: BatchFetch>: Send + Sync + 'static {
    /// Checks a key (by its `Display` form) before it is loaded: a key this
    /// store cannot keep fails its own loads with [`Error::InvalidKey`] and
    /// never reaches [`get`](Store::get) or [`fill`](Store::fill), so it
    /// cannot fail the other keys of its batch. Runs for every key of every
    /// batch: avoid building the key's text. The default accepts every key.
    ///
    /// # Errors
    ///
    /// Why the key cannot be kept.
    fn check_key(&self, key: &dyn fmt::Display) -> Result<(), String> {
        let _ = key;
        Ok(())
    }

    /// Looks up `keys` (deduplicated) in `namespace`; the answer is aligned
    /// with `keys`. Values expired less than `grace` ago are answered as
    /// [`Lookup::Stale`] (never an invalidated entry); with a zero grace only
    /// fresh entries are hits.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the store cannot be read.
    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error>;

    /// Fills `fill.keys()` under their locks, calling [`Fill::fetch`] for the
    /// keys that are still missing once the locks are held; the answer is
    /// aligned with `fill.keys()`.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the store fails, and whatever [`Fill::fetch`]
    /// returned, unchanged, when the provider fails. Nothing fetched by a
    /// failed [`Fill::fetch`] call is written. A fill that fails after some
    /// of its keys were written must not fail those: it answers them, and
    /// the others [`Filled::Failed`] with the error (a failure reaches only
    /// the loads it concerns).
    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error>;

    /// A background refresh of expired keys (stale-while-revalidate): like
    /// [`fill`](Self::fill), but it only *tries* the keys' locks and returns
    /// `None` at once when another filler or refresher holds one, so a
    /// refresh never queues behind another. The default fills normally.
    ///
    /// # Errors
    ///
    /// As [`fill`](Self::fill).
    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        self.fill(fill).await.map(Some)
    }

    /// Invalidates `keys` in `namespace`: takes the same per-key locks as a
    /// fill (so it waits for fills in progress, and no fill interleaves),
    /// makes every entry of the keys unservable, and returns once that is
    /// durable. A fill that starts after it returns fetches afresh.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] or [`Error::LockTimeout`]; the keys may then be
    /// partly invalidated, and invalidating again is safe.
    async fn invalidate(&self, namespace: &str, keys: &[F::Key]) -> Result<(), Error>;

    /// Invalidates every key of `namespace`: waits for the namespace's fills
    /// in progress (and holds new ones back) while it makes every entry
    /// unservable, then announces it. Versions still only grow afterwards.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] or [`Error::LockTimeout`]; invalidating again is
    /// safe.
    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error>;

    /// Runs `work` (the caller's write to the source of truth) while holding
    /// the locks of `keys`, then invalidates them and makes that durable:
    /// no fill of these keys runs alongside the write, and none that started
    /// before it can write back what it read.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] or [`Error::LockTimeout`]; `work` may or may not
    /// have run (it has if the locks were taken).
    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[F::Key],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error>;

    /// Compare-and-set: under the key's lock, replaces the entry of `key`
    /// with `value`, fresh for `ttl`, if its version is `expected`; returns
    /// the new version.
    ///
    /// # Errors
    ///
    /// [`Error::VersionMismatch`] when the version differs (or there is no
    /// entry); [`Error::Store`] or [`Error::LockTimeout`] when the store
    /// fails.
    async fn put_if_version(
        &self,
        namespace: &str,
        key: &F::Key,
        expected: u64,
        value: F::Value,
        ttl: Duration,
    ) -> Result<u64, Error>;

    /// The store's invalidation events, published by every cache sharing it
    /// (on any instance); `None` when the store has none. A receiver that
    /// lags behind (or a store whose event connection was re-established)
    /// is told with [`Invalidation::Missed`](crate::Invalidation::Missed).
    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        None
    }

    /// The longest a fill may take once it holds its locks, if the store
    /// bounds it (a shared store must: a hung provider must not hold keys
    /// forever). The cache's provider timeout must be shorter. `None`, the
    /// default, means unbounded.
    fn fill_time_limit(&self) -> Option<Duration> {
        None
    }
}

#[async_trait::async_trait]
impl<F: BatchFetch, S: Store<F> + ?Sized> Store<F> for Arc<S> {
    fn check_key(&self, key: &dyn fmt::Display) -> Result<(), String> {
        (**self).check_key(key)
    }

    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        (**self).get(namespace, keys, grace).await
    }

    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        (**self).refresh(fill).await
    }

    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error> {
        (**self).fill(fill).await
    }

    fn fill_time_limit(&self) -> Option<Duration> {
        (**self).fill_time_limit()
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        (**self).subscribe()
    }

    async fn invalidate(&self, namespace: &str, keys: &[F::Key]) -> Result<(), Error> {
        (**self).invalidate(namespace, keys).await
    }

    async fn put_if_version(
        &self,
        namespace: &str,
        key: &F::Key,
        expected: u64,
        value: F::Value,
        ttl: Duration,
    ) -> Result<u64, Error> {
        (**self)
            .put_if_version(namespace, key, expected, value, ttl)
            .await
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        (**self).invalidate_namespace(namespace).await
    }

    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[F::Key],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error> {
        (**self).write_locked(namespace, keys, work).await
    }
}

/// One fill request handed to [`Store::fill`]: the keys, their time to live,
/// and the way to the provider.
pub struct Fill<'a, F: BatchFetch> {
    pub(crate) namespace: &'a str,
    pub(crate) keys: &'a [F::Key],
    pub(crate) ttl: Duration,
    pub(crate) negative_ttl: Duration,
    pub(crate) provider: &'a ProviderCaller<F>,
    pub(crate) prepaid: &'a Prepaid,
    pub(crate) counters: &'a Counters,
    pub(crate) leave: &'a (dyn Fn(&[usize]) + Send + Sync),
}

impl<F: BatchFetch> Fill<'_, F> {
    /// The namespace the keys belong to.
    pub fn namespace(&self) -> &str {
        self.namespace
    }

    /// The keys to fill: deduplicated, in first-asked order.
    pub fn keys(&self) -> &[F::Key] {
        self.keys
    }

    /// How long a fetched value stays fresh.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How long a negative entry (provider has no such key) stays fresh.
    pub fn negative_ttl(&self) -> Duration {
        self.negative_ttl
    }

    /// The provider's `max_batch_size`: [`fetch`](Self::fetch) splits its
    /// keys into calls of at most this many. A store that fills in groups
    /// should make groups a multiple of it.
    pub fn max_batch_size(&self) -> usize {
        self.provider.max_batch_size()
    }

    /// Tells the cache that the writes for the keys at `indices` (into
    /// [`keys`](Self::keys)) are about to become visible: call it right
    /// before committing them (before releasing their locks), also for keys
    /// that the re-read found. From then on, loads of those keys in this
    /// process read the store instead of joining this fill, so a load that
    /// starts after an invalidation of the key returned can never receive a
    /// value this fill read or fetched before it. A store that never calls
    /// it keeps the keys joinable until the fill returns.
    pub fn about_to_commit(&self, indices: &[usize]) {
        (self.leave)(indices);
    }

    /// Reports how long the fill waited for its keys' locks; counted in
    /// [`Stats::lock_wait_total`](crate::Stats::lock_wait_total) and
    /// [`Stats::lock_wait_max`](crate::Stats::lock_wait_max).
    pub fn record_lock_wait(&self, waited: Duration) {
        self.counters.record_lock_wait(waited);
    }

    /// The longest [`fetch`](Self::fetch) of `keys` keys may take: its
    /// calls one after another (as many at a time as the cache's chunk
    /// concurrency), each with every attempt at the provider timeout and
    /// every backoff after a transient failure. Waits for the rate limiter's
    /// budget and for rate-limited answers are not included (the latter are
    /// bounded by the retry policy's rate-limit deadline, which the cache's
    /// build checks against [`Store::fill_time_limit`]). A store that
    /// leases keys for a fetch leases them at least this long, and renews
    /// its leases while the fetch runs past that.
    pub fn fetch_bound(&self, keys: usize) -> Duration {
        self.provider.worst_case(keys)
    }

    /// Waits for the provider's budget for the first call of `keys` keys
    /// and reserves it for this fill's first [`fetch`](Self::fetch) call. A
    /// store that holds locks or connections across the fetch calls it
    /// before taking them, so that nothing is held while the budget is
    /// exhausted; a store that holds nothing across the fetch does not need
    /// it (the budget is then charged when the call is made).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when a fleet-wide limiter cannot be reached.
    pub async fn prepay_first_call(&self, keys: usize) -> Result<(), Error> {
        self.provider
            .prepay(keys, self.prepaid, self.counters)
            .await
    }

    /// Whether this fill's calls may carry keys other instances missed:
    /// they wait for turns of a fleet-wide budget, and the provider can
    /// tell a key from its text ([`BatchFetch::parse_key`]), tried on
    /// `sample`, one of the fill's own.
    #[cfg(feature = "postgres")]
    pub(crate) fn shares_calls(&self, sample: &str) -> bool {
        self.provider.takes_fleet_turns() && self.provider.provider().parse_key(sample).is_some()
    }

    /// Whether the fleet-wide budget this fill's calls wait for binds now:
    /// one of this cache's calls waited for its turn lately. Calls are
    /// opened to the fleet only then; while the budget does not bind,
    /// they go at once and joining one would only add a round trip.
    #[cfg(feature = "postgres")]
    pub(crate) fn fleet_binds(&self) -> bool {
        self.provider.fleet_binds()
    }

    /// Reports that `keys` keys were found leased by another holder and
    /// waited for; counted in [`Stats::lease_waits`](crate::Stats::lease_waits).
    pub fn record_lease_wait(&self, keys: usize) {
        Counters::add(&self.counters.lease_waits, keys);
    }

    /// Reports expired leases taken over; counted in
    /// [`Stats::lease_takeovers`](crate::Stats::lease_takeovers).
    pub fn record_takeovers(&self, keys: usize) {
        Counters::add(&self.counters.lease_takeovers, keys);
    }

    /// Reports keys whose lease was revoked while they were fetched;
    /// counted in [`Stats::leases_revoked`](crate::Stats::leases_revoked).
    pub fn record_revoked(&self, keys: usize) {
        Counters::add(&self.counters.leases_revoked, keys);
    }

    /// Asks the provider for `keys`, in as few calls as its
    /// `max_batch_size` allows, under the cache's rate limits, timeout and
    /// retry policy. Call it only while this fill has the keys to itself
    /// (their locks, or their leases), with only the keys still missing. A
    /// key absent from the answer is not found.
    ///
    /// # Errors
    ///
    /// [`Error::Provider`], [`Error::ProviderPanicked`],
    /// [`Error::ProviderTimeout`] or [`Error::RateLimited`]; the store must
    /// then write nothing from this fill and return the error.
    ///
    /// A key the provider failed alone (see
    /// [`BatchFetch::fetch_each`]) fails the
    /// whole answer here, with its error: a store that can answer keys on
    /// their own uses [`fetch_each`](Self::fetch_each).
    pub async fn fetch(&self, keys: &[F::Key]) -> Result<HashMap<F::Key, F::Value>, Error> {
        self.fetch_each(keys)
            .await?
            .into_iter()
            .map(|(key, answer)| answer.map(|value| (key, value)))
            .collect()
    }

    /// [`fetch`](Self::fetch), answering each key on its own: `Ok(value)`,
    /// or `Err` for a key that failed alone (or whose chunk failed after
    /// other chunks were answered); a key absent from the map is not found.
    /// Write nothing for a failed key (not even a negative entry), release
    /// what the fill holds of it, and answer it [`Filled::Failed`] with its
    /// error.
    ///
    /// # Errors
    ///
    /// As [`fetch`](Self::fetch), when the call failed before any key was
    /// answered.
    pub async fn fetch_each(
        &self,
        keys: &[F::Key],
    ) -> Result<HashMap<F::Key, Result<F::Value, Error>>, Error> {
        self.provider
            .call(keys, self.prepaid, self.counters, None)
            .await
    }

    /// [`fetch`](Self::fetch) in a call that, at its turn of a fleet-wide
    /// budget, closes the fleet's call `sharing` stands for and carries the
    /// keys others joined to it (answered to `sharing`).
    #[cfg(feature = "postgres")]
    pub(crate) async fn fetch_each_shared(
        &self,
        keys: &[F::Key],
        sharing: &dyn crate::caller::SharedCall<F::Key, F::Value>,
    ) -> Result<HashMap<F::Key, Result<F::Value, Error>>, Error> {
        self.provider
            .call(keys, self.prepaid, self.counters, Some(sharing))
            .await
    }
}

impl<F: BatchFetch> fmt::Debug for Fill<'_, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fill")
            .field("namespace", &self.namespace)
            .field("keys", &self.keys.len())
            .field("ttl", &self.ttl)
            .field("negative_ttl", &self.negative_ttl)
            .finish()
    }
}

/// The 64-bit lock id of `(namespace, key)`: FNV-1a over the namespace, a
/// `0xff` separator (a byte no UTF-8 text contains) and the key's
/// [`Display`](std::fmt::Display) form.
///
/// Stable across versions and platforms (a test pins a known id), so every
/// instance of a fleet derives the same id for the same key. Two keys may
/// share an id; that only makes one wait for the other, never returns a wrong
/// value, since entries are stored under the full key.
pub fn lock_id(namespace: &str, key: &str) -> i64 {
    fnv1a(namespace, 0xff, key)
}

/// The 64-bit lock id that stands for a whole namespace (used by
/// [`LockMode::Namespace`](crate::LockMode::Namespace)): FNV-1a over the
/// namespace and a `0xfe` separator, so it never equals a key's
/// [`lock_id`] by construction of the input (a collision of hashes remains
/// possible and, as with keys, only adds waiting).
pub fn namespace_lock_id(namespace: &str) -> i64 {
    fnv1a(namespace, 0xfe, "")
}

fn fnv1a(namespace: &str, separator: u8, key: &str) -> i64 {
    let bytes = namespace
        .bytes()
        .chain(std::iter::once(separator))
        .chain(key.bytes());
    // The bits as Postgres' bigint.
    fnv1a64(bytes) as i64
}

/// [`lock_id`] of a key given by its `Display` form, without building the
/// text (shard routing runs for every key of every batch).
pub(crate) fn display_lock_id(namespace: &str, key: &dyn fmt::Display) -> i64 {
    struct Fnv(u64);
    impl fmt::Write for Fnv {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            self.0 = fnv1a64_from(self.0, text.bytes());
            Ok(())
        }
    }
    let start = fnv1a64(namespace.bytes().chain(std::iter::once(0xff)));
    let mut hash = Fnv(start);
    // Writing into the hash cannot fail; a `Display` that fails hashes what
    // it wrote, as `to_string` would have panicked instead.
    let _ = fmt::write(&mut hash, format_args!("{key}"));
    hash.0 as i64
}

/// 64-bit FNV-1a of `bytes`: the same in every process and version, for
/// ids that instances must agree on (lock ids, event channels) and stable
/// shards.
pub(crate) fn fnv1a64(bytes: impl IntoIterator<Item = u8>) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    fnv1a64_from(OFFSET, bytes)
}

/// FNV-1a continued from `hash` over `bytes`.
fn fnv1a64_from(hash: u64, bytes: impl IntoIterator<Item = u8>) -> u64 {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.into_iter().fold(hash, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// Whether the `Display` form of `value` contains `needle`, without
/// building the text (a key check runs for every key of every batch).
#[cfg(any(feature = "postgres", feature = "http"))]
pub(crate) fn displays_char(value: &dyn fmt::Display, needle: char) -> bool {
    struct Finder {
        needle: char,
        found: bool,
    }
    impl fmt::Write for Finder {
        fn write_str(&mut self, text: &str) -> fmt::Result {
            if text.contains(self.needle) {
                self.found = true;
                // Stops the formatting: the answer is known.
                return Err(fmt::Error);
            }
            Ok(())
        }
    }
    let mut finder = Finder {
        needle,
        found: false,
    };
    let _ = fmt::write(&mut finder, format_args!("{value}"));
    finder.found
}

/// A lease long enough for a fetch bounded by `fetch`: a tenth more for
/// clock drift, and `margin` for what the store does around the fetch.
pub(crate) fn lease_covering(fetch: Duration, margin: Duration) -> Duration {
    fetch.saturating_add(fetch / 10).saturating_add(margin)
}

/// A fill that ended with a key unanswered: a bug, reported, never a panic.
pub(crate) fn unsettled() -> Error {
    Error::Store {
        message: "a fill left a key unanswered".into(),
        source: None,
    }
}

/// What a fill whose rounds answered into `answers` returns, given how the
/// rounds ended: every answer (`Ok(true)`); `None` when a refresh gave up
/// (`Ok(false)`); after an error, the keys already answered with their
/// answers and the rest [`Filled::Failed`], so a failure reaches only the
/// keys it concerns (the error alone when nothing was answered, or for a
/// refresh).
/// Splits a fill's per-key answers into what to write (values; a key
/// absent is not found) and the keys that failed, with their errors.
pub(crate) fn split_failed<K: Eq + std::hash::Hash, V>(
    answers: HashMap<K, Result<V, Error>>,
) -> (HashMap<K, V>, HashMap<K, Error>) {
    let mut values = HashMap::with_capacity(answers.len());
    let mut failed = HashMap::new();
    for (key, answer) in answers {
        match answer {
            Ok(value) => {
                values.insert(key, value);
            }
            Err(err) => {
                failed.insert(key, err);
            }
        }
    }
    (values, failed)
}

/// A fill's per-key answers for the keys at `indices` (`keys`, aligned),
/// with the keys the provider failed alone taken out: those are answered
/// [`Filled::Failed`] in `answers`, and their indices are in `failed`.
#[cfg(feature = "postgres")]
pub(crate) struct Answered<K, V> {
    /// The values to write; a key of `keys` absent here is not found.
    pub(crate) values: HashMap<K, V>,
    /// The keys left to write, and their indices.
    pub(crate) indices: Vec<usize>,
    pub(crate) keys: Vec<K>,
    /// The indices of the failed keys.
    pub(crate) failed: Vec<usize>,
}

#[cfg(feature = "postgres")]
pub(crate) fn answer_failed<K: Eq + std::hash::Hash, V>(
    fetched: HashMap<K, Result<V, Error>>,
    indices: &[usize],
    keys: Vec<K>,
    answers: &mut [Option<Filled<V>>],
) -> Answered<K, V> {
    let (values, mut errors) = split_failed(fetched);
    let mut answered = Answered {
        values,
        indices: Vec::with_capacity(indices.len()),
        keys: Vec::with_capacity(keys.len()),
        failed: Vec::new(),
    };
    for (&i, key) in indices.iter().zip(keys) {
        match errors.remove(&key) {
            Some(err) => {
                answers[i] = Some(Filled::Failed(err));
                answered.failed.push(i);
            }
            None => {
                answered.indices.push(i);
                answered.keys.push(key);
            }
        }
    }
    answered
}

pub(crate) fn fill_answers<V>(
    rounds: Result<bool, Error>,
    answers: Vec<Option<Filled<V>>>,
    try_only: bool,
) -> Result<Option<Vec<Filled<V>>>, Error> {
    match rounds {
        Ok(true) => answers
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(unsettled),
        Ok(false) => Ok(None),
        Err(err) if !try_only && answers.iter().any(Option::is_some) => Ok(Some(
            answers
                .into_iter()
                .map(|answer| answer.unwrap_or_else(|| Filled::Failed(err.clone())))
                .collect(),
        )),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned: every instance of a fleet, whatever its version, must derive
    /// the same ids. A change here is a breaking change of the protocol.
    #[test]
    fn lock_ids_are_pinned() {
        // Computed independently (FNV-1a 64, offset 0xcbf29ce484222325,
        // prime 0x100000001b3; "a" hashes to 0xaf63dc4c8601ec8c).
        assert_eq!(lock_id("users/v1", "42"), -1_177_130_794_309_126_684);
        assert_eq!(namespace_lock_id("users/v1"), -782_140_159_390_205_135);
        assert_eq!(fnv1a("", b'a', "") as u64, 0xaf63_dc4c_8601_ec8c);
        assert_ne!(lock_id("users/v1", "42"), lock_id("users/v1", "43"));
        assert_ne!(lock_id("a", "bc"), lock_id("ab", "c"));
        assert_eq!(display_lock_id("users/v1", &42), lock_id("users/v1", "42"));
    }
}
