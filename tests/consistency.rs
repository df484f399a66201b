//! Invalidation serialized with fills: after `invalidate` returns, no load
//! that starts afterwards, on any instance, returns a value older than the
//! write that preceded the invalidation.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use loadlock::store::ShardedStore;
use loadlock::{
    BatchFetch, Cache, FillMode, LockMode, MemoryStore, PgRateLimit, PgStore, Quota, RetryPolicy,
    Store,
};
use rand::{Rng, SeedableRng};
use support::pg::TestDb;
use tokio::sync::Semaphore;

/// The source of truth: a version per key, bumped by writers.
#[derive(Clone, Default)]
struct Source {
    versions: Arc<Mutex<HashMap<u64, u64>>>,
}

impl Source {
    fn read(&self, key: u64) -> u64 {
        *self.versions.lock().unwrap().get(&key).unwrap_or(&0)
    }

    fn write(&self, key: u64) -> u64 {
        let mut versions = self.versions.lock().unwrap();
        let version = versions.entry(key).or_insert(0);
        *version += 1;
        *version
    }
}

/// A provider that reads the source at a random point of a slow call, so
/// fills that read an old version can still be running when the source
/// changes.
#[derive(Clone)]
struct SlowReader {
    source: Source,
    namespace: String,
    seed: Arc<AtomicU64>,
    /// When set, every call takes a permit before reading: a test holds a
    /// fill mid-fetch with it.
    gate: Option<Arc<Semaphore>>,
    read_done: Arc<Semaphore>,
    max_batch: usize,
    /// A key whose next call, after reading the source, blocks its thread
    /// for the given time: on a runtime of one thread, the whole instance
    /// hangs (its lease renewals too), as a stopped process would.
    hang: Arc<Mutex<Option<(u64, Duration)>>>,
    /// Whether it tells keys from their texts (so its calls waiting for a
    /// fleet budget carry other instances' keys).
    parse: bool,
}

impl SlowReader {
    fn new(source: &Source, namespace: &str) -> Self {
        SlowReader {
            source: source.clone(),
            namespace: namespace.to_owned(),
            seed: Arc::new(AtomicU64::new(1)),
            gate: None,
            read_done: Arc::new(Semaphore::new(0)),
            max_batch: 100,
            hang: Arc::new(Mutex::new(None)),
            parse: false,
        }
    }
}

#[async_trait::async_trait]
impl BatchFetch for SlowReader {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch
    }

    fn parse_key(&self, text: &str) -> Option<u64> {
        self.parse.then(|| text.parse().ok()).flatten()
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        let seed = self.seed.fetch_add(1, Ordering::Relaxed);
        let (before, after) = {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            (rng.gen_range(0..8u64), rng.gen_range(0..15u64))
        };
        tokio::time::sleep(Duration::from_millis(before)).await;
        let values = keys.iter().map(|&k| (k, self.source.read(k))).collect();
        self.read_done.add_permits(1);
        let hang = {
            let mut hang = self.hang.lock().unwrap();
            match *hang {
                Some((key, time)) if keys.contains(&key) => {
                    *hang = None;
                    Some(time)
                }
                _ => None,
            }
        };
        if let Some(time) = hang {
            std::thread::sleep(time);
        }
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate").forget();
        }
        tokio::time::sleep(Duration::from_millis(after)).await;
        Ok(values)
    }
}

/// How an invalidation meets a fill in progress.
#[derive(Clone, Copy, PartialEq)]
enum Meets {
    /// It waits for the fill (the fill holds the keys' locks).
    Waits,
    /// It revokes the fill's lease at once; the fill fetches again.
    Revokes,
}

/// What ends the fill's claim on the key in the classic race.
#[derive(Clone, Copy)]
enum By {
    /// `Cache::invalidate`, after the source changed.
    Invalidate,
    /// `Cache::write`, whose update runs with the keys locked (the source
    /// changed already; it has nothing left to do).
    Write,
    /// `Cache::invalidate_namespace`.
    Namespace,
}

/// The classic race, step by step: a fill has read v1 and is held before it
/// writes; the source changes to v2 and `invalidate` (or `write`, or
/// `invalidate_namespace`) is called on another instance. Either it
/// waits for the fill, or it revokes the fill's lease, and the fill, which
/// fetched v1, must neither write nor deliver it. Once it returns, every
/// instance loads v2. `namespace` is the test's own (advisory locks are
/// database-wide, and tests run at the same time).
async fn slow_reader_cannot_write_back<S: Store<SlowReader> + Clone>(
    stores: Vec<S>,
    meets: Meets,
    by: By,
    namespace: &str,
) {
    let source = Source::default();
    source.write(1); // v1
    let gate = Arc::new(Semaphore::new(0));
    let mut slow = SlowReader::new(&source, namespace);
    slow.gate = Some(gate.clone());
    let holder = Cache::builder(slow.clone())
        .store(stores[0].clone())
        .build()
        .unwrap();
    let others: Vec<_> = stores[1..]
        .iter()
        .map(|store| {
            Cache::builder(SlowReader::new(&source, namespace))
                .store(store.clone())
                .build()
                .unwrap()
        })
        .collect();

    // The fill reads v1, then is held.
    let filling = tokio::spawn({
        let holder = holder.clone();
        async move { holder.loader().load(1).await }
    });
    slow.read_done.acquire().await.unwrap().forget();
    assert_eq!(source.write(1), 2); // the source changes to v2
    let started = Arc::new(Semaphore::new(0));
    let invalidating = tokio::spawn({
        let (cache, started) = (others[0].clone(), started.clone());
        async move {
            started.add_permits(1);
            match by {
                By::Invalidate => cache.invalidate([1]).await.map_err(|e| e.to_string()),
                By::Write => cache.write([1], async {}).await.map_err(|e| e.to_string()),
                By::Namespace => cache
                    .invalidate_namespace()
                    .await
                    .map_err(|e| e.to_string()),
            }
        }
    });
    started.acquire().await.unwrap().forget();
    if meets == Meets::Waits {
        // The invalidation (running) waits for the held fill.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !invalidating.is_finished(),
            "invalidate must wait for the fill"
        );
        gate.add_permits(1);
        assert_eq!(
            filling.await.unwrap().unwrap(),
            Some(1),
            "the fill that began before"
        );
        invalidating.await.unwrap().unwrap();
    } else {
        // The invalidation returns while the fill is still held, revoking
        // its lease; the fill's v1 is neither written nor delivered: it
        // fetches again (a second pass through the gate) and returns v2.
        tokio::time::timeout(Duration::from_secs(10), invalidating)
            .await
            .expect("invalidate must not wait for a leased fill")
            .unwrap()
            .unwrap();
        gate.add_permits(2);
        assert_eq!(
            filling.await.unwrap().unwrap(),
            Some(2),
            "a fill whose lease was revoked delivers nothing it fetched before"
        );
        assert_eq!(holder.stats().leases_revoked, 1);
    }

    for cache in others.iter().chain([&holder]) {
        assert_eq!(cache.loader().load(1).await.unwrap(), Some(2));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_memory_store() {
    let store = MemoryStore::new();
    let stores = vec![store.clone(), store.clone(), store];
    slow_reader_cannot_write_back(
        stores,
        Meets::Revokes,
        By::Invalidate,
        "consistency/classic",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_by_write_memory_store() {
    let store = MemoryStore::new();
    let stores = vec![store.clone(), store.clone(), store];
    slow_reader_cannot_write_back(stores, Meets::Revokes, By::Write, "consistency/classic-w").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_by_namespace_invalidation_memory_store() {
    let store = MemoryStore::new();
    let stores = vec![store.clone(), store.clone(), store];
    slow_reader_cannot_write_back(
        stores,
        Meets::Revokes,
        By::Namespace,
        "consistency/classic-ns",
    )
    .await;
}

async fn classic_race_on_postgres(fill: FillMode, meets: Meets, by: By, tag: &str) {
    let db = TestDb::new(tag).await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(db.store_with(LockMode::PerKey, fill).await);
    }
    let pool = stores[0].pool().clone();
    let namespace = format!("consistency/classic/{tag}");
    slow_reader_cannot_write_back(stores, meets, by, &namespace).await;
    // The table holds v2, never the v1 fetched before the invalidation.
    let value: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT value FROM {} WHERE namespace = $1 AND key = '1'",
        db.table()
    )))
    .bind(&namespace)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(value, serde_json::json!(2));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_postgres_leases() {
    classic_race_on_postgres(
        FillMode::Lease,
        Meets::Revokes,
        By::Invalidate,
        "classic_lease",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_by_write_postgres_leases() {
    classic_race_on_postgres(FillMode::Lease, Meets::Revokes, By::Write, "classic_write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_by_namespace_invalidation_postgres_leases() {
    classic_race_on_postgres(FillMode::Lease, Meets::Revokes, By::Namespace, "classic_ns").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_race_postgres_held_transactions() {
    classic_race_on_postgres(
        FillMode::HeldTransaction,
        Meets::Waits,
        By::Invalidate,
        "classic_held",
    )
    .await;
}

/// One recorded load: the key, when it started, the version it returned.
struct Read {
    key: u64,
    started: Instant,
    version: u64,
}

/// One recorded invalidation: the key, the version written before it, when
/// it returned.
struct Invalidated {
    key: u64,
    version: u64,
    returned: Instant,
}

/// A randomized history over `caches` (instances sharing one store): loads,
/// source writes each followed by `invalidate`, from random instances, all
/// concurrent. The checker fails on any load that started after an
/// invalidation of its key returned and still saw a version older than the
/// write before that invalidation. Returns (loads checked, invalidations,
/// leases taken over).
///
/// With a `staller` store, one more instance (on that store, which it
/// alone uses: what it opens lives on its runtime) stalls past its leases:
/// it runs on a runtime of its own with one thread, its provider takes one
/// key per call,
/// and the call of a fill's first key, having read the source, blocks that
/// thread for 2.5 s (the instance hangs, its lease renewals too), longer
/// than its lease (a 100 ms provider timeout makes it 2.2 s), while the
/// other instances take the keys over, fetch, publish, invalidate; then it
/// tries to publish the value it fetched first; it tries until it has
/// stalled twice. The history runs long enough for it (a few seconds).
async fn history<S: Store<SlowReader> + Clone>(
    stores: Vec<S>,
    tag: &str,
    seed: u64,
    staller: Option<S>,
    budget: Option<PgRateLimit>,
) -> (usize, usize, u64, u64) {
    let stall = staller.is_some();
    const KEYS: u64 = 4;
    const WORKERS: usize = 16;
    const OPS_PER_WORKER: usize = 40;
    const STALL_TRIES: usize = 8;
    let source = Source::default();
    let caches: Vec<Cache<SlowReader>> = stores
        .iter()
        .map(|store| {
            let mut provider = SlowReader::new(&source, &format!("consistency/{tag}"));
            provider.parse = budget.is_some();
            let cache = Cache::builder(provider).store(store.clone());
            match &budget {
                Some(budget) => cache.fleet_rate_limit(budget.clone()),
                None => cache,
            }
            .build()
            .unwrap()
        })
        .collect();
    let reads = Arc::new(Mutex::new(Vec::new()));
    let invalidations = Arc::new(Mutex::new(Vec::new()));
    // With a stalling holder: slower workers that keep going until it is
    // done, and rarer invalidations, so that its leases expire (and are
    // taken over) before an invalidation revokes them.
    let pause = if stall { 50..150 } else { 0..4 };
    let invalidating = if stall { 0.01 } else { 0.25 };
    let staller_done = Arc::new(std::sync::atomic::AtomicBool::new(!stall));
    let staller = staller.map(|staller| {
        let mut provider = SlowReader::new(&source, &format!("consistency/{tag}"));
        provider.max_batch = 1;
        let hang = provider.hang.clone();
        let cache = Cache::builder(provider)
            .store(staller)
            .provider_timeout(Duration::from_millis(100))
            .retry(RetryPolicy::none())
            .build()
            .unwrap();
        let (reads, invalidations, done) =
            (reads.clone(), invalidations.clone(), staller_done.clone());
        let (source, other) = (source.clone(), caches[1].clone());
        let reader = caches[1].clone();
        // The other instances run on, on the test's runtime.
        let fleet = tokio::runtime::Handle::current();
        let instance = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let thread = std::thread::spawn(move || {
            instance.block_on(async move {
                let invalidate = move |key: u64| {
                    let (source, other, invalidations) =
                        (source.clone(), other.clone(), invalidations.clone());
                    async move {
                        let version = source.write(key);
                        other.invalidate([key]).await.unwrap();
                        invalidations.lock().unwrap().push(Invalidated {
                            key,
                            version,
                            returned: Instant::now(),
                        });
                    }
                };
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + 999);
                // The stall needs the staller to lease its first key, and
                // the other instances' loads may lease it first (between
                // the invalidation and the staller's claim): it tries
                // again until it has stalled twice, within a bound.
                let (mut stalls, mut tries) = (0, 0);
                while stalls < 2 {
                    assert!(
                        tries < STALL_TRIES,
                        "the staller stalled {stalls} times in {STALL_TRIES} tries: the other \
                         instances leased its first key before it every other time"
                    );
                    tries += 1;
                    let first = rng.gen_range(0..KEYS);
                    let pair = [first, (first + 1) % KEYS];
                    // Misses, so that the staller fills them.
                    // On the fleet's runtime: what the other instances'
                    // stores open must not live on this one.
                    fleet.spawn(invalidate(pair[0])).await.unwrap();
                    fleet.spawn(invalidate(pair[1])).await.unwrap();
                    // Once its leases have expired and been taken over, and
                    // before it publishes what it fetched first, the source
                    // changes again.
                    let later = fleet.spawn({
                        let invalidate = invalidate.clone();
                        async move {
                            tokio::time::sleep(Duration::from_millis(2350)).await;
                            invalidate(pair[0]).await;
                        }
                    });
                    let started = Instant::now();
                    *hang.lock().unwrap() = Some((pair[0], Duration::from_millis(2500)));
                    // Revoked every time it fetched: it gives up, having
                    // delivered nothing stale.
                    let loaded = cache.loader().load_many(pair).await;
                    // Emptied by the call that stalled; emptied here
                    // otherwise, so that no later call stalls.
                    if hang.lock().unwrap().take().is_none() {
                        stalls += 1;
                    }
                    later.await.unwrap();
                    // What the table holds for the first key once the
                    // stalled fill is over, read by another instance after
                    // the last invalidation returned: a value published
                    // under the lease it lost would be older than that.
                    let reader = reader.clone();
                    let (read_at, version) = fleet
                        .spawn(async move {
                            let read_at = Instant::now();
                            (read_at, reader.loader().load(pair[0]).await)
                        })
                        .await
                        .unwrap();
                    reads.lock().unwrap().push(Read {
                        key: pair[0],
                        started: read_at,
                        version: version.unwrap().unwrap(),
                    });
                    let Ok(loaded) = loaded else {
                        continue;
                    };
                    for (key, version) in loaded {
                        reads.lock().unwrap().push(Read {
                            key,
                            started,
                            version,
                        });
                    }
                }
                done.store(true, Ordering::Relaxed);
            })
        });
        tokio::task::spawn_blocking(move || thread.join().expect("the stalling instance"))
    });
    let workers = (0..WORKERS).map(|w| {
        let (caches, source, reads, invalidations) = (
            caches.clone(),
            source.clone(),
            reads.clone(),
            invalidations.clone(),
        );
        let (pause, staller_done) = (pause.clone(), staller_done.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + w as u64);
            for op in 0.. {
                if op >= OPS_PER_WORKER && staller_done.load(Ordering::Relaxed) {
                    break;
                }
                let cache = &caches[rng.gen_range(0..caches.len())];
                let key = rng.gen_range(0..KEYS);
                if rng.gen_bool(invalidating) {
                    let version = source.write(key);
                    cache.invalidate([key]).await.unwrap();
                    invalidations.lock().unwrap().push(Invalidated {
                        key,
                        version,
                        returned: Instant::now(),
                    });
                } else {
                    let started = Instant::now();
                    let version = cache.loader().load(key).await.unwrap().unwrap();
                    reads.lock().unwrap().push(Read {
                        key,
                        started,
                        version,
                    });
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(pause.clone()))).await;
            }
        })
    });
    for worker in join_all(workers).await {
        worker.unwrap();
    }
    if let Some(staller) = staller {
        staller.await.unwrap();
    }
    let takeovers = caches.iter().map(|c| c.stats().lease_takeovers).sum();

    let reads = reads.lock().unwrap();
    let invalidations = invalidations.lock().unwrap();
    let mut stale = Vec::new();
    for read in reads.iter() {
        let required = invalidations
            .iter()
            .filter(|inv| inv.key == read.key && inv.returned < read.started)
            .map(|inv| inv.version)
            .max()
            .unwrap_or(0);
        if read.version < required {
            stale.push((read.key, read.version, required));
        }
    }
    assert!(
        stale.is_empty(),
        "{} stale reads after an invalidation returned (key, seen, required): {stale:?}",
        stale.len()
    );
    let carried = caches.iter().map(|cache| cache.stats().carried_keys).sum();
    (reads.len(), invalidations.len(), takeovers, carried)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_memory_store() {
    let store = MemoryStore::new();
    let (mut loads, mut invalidations) = (0, 0);
    for seed in 0..5 {
        let (l, i, _, _) = history(
            vec![store.clone(); 4],
            &format!("mem{seed}"),
            seed,
            None,
            None,
        )
        .await;
        loads += l;
        invalidations += i;
    }
    eprintln!("memory store: {loads} loads checked against {invalidations} invalidations");
}

/// Four instances' stores on `db`, each on a pool of its own.
async fn instances(db: &TestDb) -> Vec<PgStore> {
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(db.store(LockMode::PerKey).await);
    }
    stores
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_postgres() {
    let db = TestDb::new("history").await;
    let stores = instances(&db).await;
    let (mut loads, mut invalidations) = (0, 0);
    for seed in 0..5 {
        let (l, i, _, _) = history(stores.clone(), &format!("pg{seed}"), seed, None, None).await;
        loads += l;
        invalidations += i;
    }
    eprintln!("postgres, 4 instances: {loads} loads checked against {invalidations} invalidations");
    db.cleanup().await;
}

/// The history on Postgres under a fleet budget that binds (100 calls/s
/// for the 4 instances), the provider parsing keys: calls that wait for
/// their turn carry keys other instances joined to them, and no load
/// returns a value older than an invalidation that returned before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_postgres_sharing_calls() {
    let db = TestDb::new("history_shared").await;
    let stores = instances(&db).await;
    let budget = db
        .budget(Quota::per_second(std::num::NonZeroU32::new(100).unwrap()))
        .await;
    let (mut loads, mut invalidations, mut carried) = (0, 0, 0);
    for seed in 0..3 {
        let (l, i, _, c) = history(
            stores.clone(),
            &format!("shared{seed}"),
            seed,
            None,
            Some(budget.clone()),
        )
        .await;
        loads += l;
        invalidations += i;
        carried += c;
    }
    assert!(carried > 0, "no call carried another instance's keys");
    assert_eq!(
        db.open_calls().await,
        0,
        "calls still open after the history"
    );
    eprintln!(
        "postgres, 4 instances sharing calls: {loads} loads checked against \
         {invalidations} invalidations, {carried} keys carried"
    );
    db.cleanup().await;
}

/// The history with a holder that stalls past its leases after fetching
/// (see `history`), on the embedded store: its leases are taken over, and
/// what it fetched before is never written or delivered after an
/// invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_memory_store_with_lease_takeovers() {
    let store = MemoryStore::new();
    let (mut loads, mut invalidations, mut takeovers) = (0, 0, 0);
    for seed in 0..2 {
        let (l, i, t, _) = history(
            vec![store.clone(); 4],
            &format!("mstall{seed}"),
            seed,
            Some(store.clone()),
            None,
        )
        .await;
        loads += l;
        invalidations += i;
        takeovers += t;
    }
    eprintln!(
        "memory store with a stalling holder: {loads} loads checked against {invalidations} \
         invalidations, {takeovers} leases taken over"
    );
    assert!(
        takeovers > 0,
        "no lease was taken over: the scenario did not happen"
    );
}

/// The history with a holder that stalls past its leases after fetching
/// (see `history`): its leases are taken over, and what it fetched before
/// is never written or delivered after an invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_postgres_with_lease_takeovers() {
    let db = TestDb::new("takeover").await;
    let stores = instances(&db).await;
    let (mut loads, mut invalidations, mut takeovers) = (0, 0, 0);
    for seed in 0..2 {
        // A store of its own per run: its connections die with its runtime.
        let staller = db.store(LockMode::PerKey).await;
        let (l, i, t, _) = history(
            stores.clone(),
            &format!("stall{seed}"),
            seed,
            Some(staller),
            None,
        )
        .await;
        loads += l;
        invalidations += i;
        takeovers += t;
    }
    eprintln!(
        "postgres with a stalling holder: {loads} loads checked against {invalidations} \
         invalidations, {takeovers} leases taken over"
    );
    assert!(
        takeovers > 0,
        "no lease was taken over: the scenario did not happen"
    );
    db.cleanup().await;
}

/// Versions only grow across fill, invalidate and refill; a compare-and-set
/// with a stale version fails, with the current one succeeds.
async fn versions_and_compare_and_set<S: Store<SlowReader> + Clone>(store: S, tag: &str) {
    let source = Source::default();
    source.write(1);
    let cache = Cache::builder(SlowReader::new(&source, &format!("consistency/{tag}")))
        .store(store)
        .build()
        .unwrap();
    let first = cache.loader().load_entry(1).await.unwrap().unwrap();
    assert_eq!(first.value, 1);
    assert!(first.version > 0);
    assert!(first.expires_at > first.fetched_at);

    source.write(1);
    cache.invalidate([1]).await.unwrap();
    let second = cache.loader().load_entry(1).await.unwrap().unwrap();
    assert_eq!(second.value, 2);
    assert!(second.version > first.version, "{second:?} after {first:?}");

    let stale = cache
        .put_if_version(1, first.version, 10)
        .await
        .unwrap_err();
    match stale {
        loadlock::Error::VersionMismatch {
            expected, actual, ..
        } => {
            assert_eq!(expected, first.version);
            assert_eq!(actual, Some(second.version));
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    let third = cache.put_if_version(1, second.version, 10).await.unwrap();
    assert!(third > second.version);
    let now = cache.loader().load_entry(1).await.unwrap().unwrap();
    assert_eq!((now.value, now.version), (10, third));

    // A key never stored has no version to match.
    let missing = cache.put_if_version(99, 1, 5).await.unwrap_err();
    assert!(matches!(
        missing,
        loadlock::Error::VersionMismatch { actual: None, .. }
    ));
}

#[tokio::test]
async fn versions_only_grow_memory_store() {
    versions_and_compare_and_set(MemoryStore::new(), "cas-mem").await;
}

#[tokio::test]
async fn versions_only_grow_postgres() {
    let db = TestDb::new("cas").await;
    versions_and_compare_and_set(db.store(LockMode::PerKey).await, "cas-pg").await;
    db.cleanup().await;
}

/// `put_if_version` revokes a lease as an invalidation does: the refill of
/// an expired entry, held at the provider after reading v1, loses its lease
/// to a compare-and-set of v2 made with the entry's version on another
/// instance; the refill neither writes v1 over v2 nor delivers it, and
/// fetches again.
async fn compare_and_set_revokes_a_refill<S: Store<SlowReader> + Clone>(stores: [S; 2], tag: &str) {
    const TTL: Duration = Duration::from_millis(200);
    let source = Source::default();
    source.write(1); // v1
    let namespace = format!("consistency/{tag}");
    let gate = Arc::new(Semaphore::new(0));
    let mut slow = SlowReader::new(&source, &namespace);
    slow.gate = Some(gate.clone());
    let [first, second] = stores;
    let holder = Cache::builder(slow.clone())
        .store(first)
        .ttl(TTL)
        .build()
        .unwrap();
    let other = Cache::builder(SlowReader::new(&source, &namespace))
        .store(second)
        .ttl(TTL)
        .build()
        .unwrap();
    let entry = other.loader().load_entry(1).await.unwrap().unwrap();
    assert_eq!(entry.value, 1);
    tokio::time::sleep(TTL * 2).await;

    // The entry expired: the holder's refill leases the key, reads v1, and
    // is held.
    let refilling = tokio::spawn({
        let holder = holder.clone();
        async move { holder.loader().load(1).await }
    });
    slow.read_done.acquire().await.unwrap().forget();
    assert_eq!(source.write(1), 2); // v2
    let put = tokio::time::timeout(
        Duration::from_secs(10),
        other.put_if_version(1, entry.version, 2),
    )
    .await
    .expect("a compare-and-set must not wait for a leased refill")
    .unwrap();
    assert!(put > entry.version);
    gate.add_permits(2);
    assert_eq!(
        refilling.await.unwrap().unwrap(),
        Some(2),
        "a refill whose lease was revoked delivers nothing it fetched before"
    );
    assert_eq!(holder.stats().leases_revoked, 1);
    assert_eq!(other.loader().load(1).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_revokes_a_refill_memory_store() {
    let store = MemoryStore::new();
    compare_and_set_revokes_a_refill([store.clone(), store], "cas-refill-mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_revokes_a_refill_postgres() {
    let db = TestDb::new("cas_refill").await;
    let stores = [
        db.store(LockMode::PerKey).await,
        db.store(LockMode::PerKey).await,
    ];
    compare_and_set_revokes_a_refill(stores, "cas-refill-pg").await;
    db.cleanup().await;
}

/// A namespace invalidation makes every key of it fetch afresh, on every
/// instance, and leaves other namespaces alone.
async fn namespace_invalidation<S: Store<SlowReader> + Clone>(stores: Vec<S>, tag: &str) {
    let source = Source::default();
    let ns = format!("consistency/{tag}");
    let caches: Vec<_> = stores
        .iter()
        .map(|store| {
            Cache::builder(SlowReader::new(&source, &ns))
                .store(store.clone())
                .build()
                .unwrap()
        })
        .collect();
    let other = Cache::builder(SlowReader::new(&source, &format!("{ns}/other")))
        .store(stores[0].clone())
        .build()
        .unwrap();
    let keys: Vec<u64> = (0..20).collect();
    for k in &keys {
        source.write(*k);
    }
    caches[0].loader().load_many(keys.clone()).await.unwrap();
    other.loader().load_many(keys.clone()).await.unwrap();
    for k in &keys {
        source.write(*k);
    }
    caches[1].invalidate_namespace().await.unwrap();
    for cache in &caches {
        let got = cache.loader().load_many(keys.clone()).await.unwrap();
        assert!(got.values().all(|&v| v == 2), "{got:?}");
    }
    let untouched = other.loader().load_many(keys.clone()).await.unwrap();
    assert!(
        untouched.values().all(|&v| v == 1),
        "other namespace kept: {untouched:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_invalidation_memory_store() {
    let store = MemoryStore::new();
    namespace_invalidation(vec![store.clone(), store], "ns-mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_invalidation_postgres() {
    let db = TestDb::new("nsinval").await;
    let stores = vec![
        db.store(LockMode::PerKey).await,
        db.store(LockMode::PerKey).await,
    ];
    namespace_invalidation(stores, "ns-pg").await;
    db.cleanup().await;
}

/// `Cache::write` holds the keys' locks while the source changes: a fill
/// started during the write waits for it and then sees the new value, and
/// every load after it returns sees the new value.
async fn write_through<S: Store<SlowReader> + Clone>(stores: Vec<S>, tag: &str) {
    let source = Source::default();
    source.write(1);
    let ns = format!("consistency/{tag}");
    let writer = Cache::builder(SlowReader::new(&source, &ns))
        .store(stores[0].clone())
        .build()
        .unwrap();
    let reader = Cache::builder(SlowReader::new(&source, &ns))
        .store(stores[1].clone())
        .build()
        .unwrap();
    assert_eq!(reader.loader().load(1).await.unwrap(), Some(1));

    let (entered, go) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let writing = tokio::spawn({
        let (writer, source, entered, go) =
            (writer.clone(), source.clone(), entered.clone(), go.clone());
        async move {
            writer
                .write([1], async move {
                    entered.add_permits(1);
                    go.acquire().await.unwrap().forget();
                    source.write(1)
                })
                .await
        }
    });
    entered.acquire().await.unwrap().forget();
    // The write holds key 1; other keys are free.
    reader.invalidate([2]).await.unwrap();
    let started = Arc::new(Semaphore::new(0));
    let reading = tokio::spawn({
        let (reader, started) = (reader.clone(), started.clone());
        async move {
            started.add_permits(1);
            reader.invalidate([1]).await.unwrap();
            reader.loader().load(1).await
        }
    });
    started.acquire().await.unwrap().forget();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !reading.is_finished(),
        "readers of the key wait for the write"
    );
    go.add_permits(1);
    assert_eq!(writing.await.unwrap().unwrap(), 2, "the write's own result");
    assert_eq!(reading.await.unwrap().unwrap(), Some(2));
    assert_eq!(reader.loader().load(1).await.unwrap(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_memory_store() {
    let store = MemoryStore::new();
    write_through(vec![store.clone(), store], "write-mem").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_postgres() {
    let db = TestDb::new("write").await;
    let stores = vec![
        db.store(LockMode::PerKey).await,
        db.store(LockMode::PerKey).await,
    ];
    write_through(stores, "write-pg").await;
    db.cleanup().await;
}

/// An instance's store sharded over two tables (`a` and `b`).
async fn sharded(a: &TestDb, b: &TestDb) -> ShardedStore<PgStore> {
    ShardedStore::new([
        ("a", a.store(LockMode::PerKey).await),
        ("b", b.store(LockMode::PerKey).await),
    ])
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_sharded_postgres() {
    let (a, b) = (
        TestDb::new("history_sa").await,
        TestDb::new("history_sb").await,
    );
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(sharded(&a, &b).await);
    }
    let (mut loads, mut invalidations) = (0, 0);
    for seed in 0..5 {
        let (l, i, _, _) =
            history(stores.clone(), &format!("sharded{seed}"), seed, None, None).await;
        loads += l;
        invalidations += i;
    }
    eprintln!("sharded postgres, 4 instances: {loads} loads checked against {invalidations} invalidations");
    a.cleanup().await;
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn namespace_invalidation_sharded_postgres() {
    let (a, b) = (
        TestDb::new("nsinval_sa").await,
        TestDb::new("nsinval_sb").await,
    );
    let stores = vec![sharded(&a, &b).await, sharded(&a, &b).await];
    namespace_invalidation(stores, "ns-sharded").await;
    a.cleanup().await;
    b.cleanup().await;
}

/// Writes whose keys span both shards hold both shards' locks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_sharded_postgres() {
    let (a, b) = (TestDb::new("write_sa").await, TestDb::new("write_sb").await);
    let stores = vec![sharded(&a, &b).await, sharded(&a, &b).await];
    write_through(stores, "write-sharded").await;
    a.cleanup().await;
    b.cleanup().await;
}

/// The same history through a real PgBouncer in transaction mode
/// (unprepared statements, events on a direct connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_history_through_pgbouncer() {
    let bouncer = support::pg::PgBouncer::start().await;
    let db = TestDb::new("history_bouncer").await;
    let mut stores = Vec::new();
    for _ in 0..4 {
        stores.push(
            db.store_through(&bouncer, LockMode::PerKey, FillMode::Lease)
                .await,
        );
    }
    let (mut loads, mut invalidations) = (0, 0);
    for seed in 0..3 {
        let (l, i, _, _) =
            history(stores.clone(), &format!("bouncer{seed}"), seed, None, None).await;
        loads += l;
        invalidations += i;
    }
    eprintln!("through pgbouncer, 4 instances: {loads} loads checked against {invalidations} invalidations");
    db.cleanup().await;
}
