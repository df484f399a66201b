//! A fleet on one Postgres table: many instances (each a `Cache` on its own
//! pool), and separate OS processes, fetch each key exactly once; disjoint
//! fills run concurrently; opposite orders never deadlock.

mod support;

use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use loadlock::{BatchFetch, Cache, FillMode, LockMode, PgStore, Quota};
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;
use support::pg::TestDb;
use support::{value_of, Fake};
use tokio::sync::Barrier;

const KEY_SPACE: u64 = 5000;

/// `count` keys drawn from Zipf(s = 1.0) over `KEY_SPACE` keys.
fn zipf_keys(rng: &mut impl Rng, count: usize) -> Vec<u64> {
    let zipf = Zipf::new(KEY_SPACE, 1.0).expect("zipf");
    (0..count).map(|_| rng.sample(zipf) as u64).collect()
}

/// How the instances of [`exactly_once_across_instances`] call the
/// provider.
#[derive(Clone, Copy, PartialEq)]
enum Calls {
    /// Each when it needs.
    Own,
    /// Under one fleet budget that binds, waiting calls carrying keys other
    /// instances joined to them (the provider parses keys).
    Shared,
}

async fn exactly_once_across_instances(mode: LockMode, fill: FillMode, tag: &str, calls: Calls) {
    const INSTANCES: usize = 8;
    const LOADERS: usize = 64;
    const KEYS_PER_LOADER: usize = 25;
    let db = TestDb::new(tag).await;
    let namespace = format!("fleet/{tag}");
    let mut provider = Fake::<u64>::builder(namespace.as_str()).delay(Duration::from_millis(5));
    if calls == Calls::Shared {
        provider = provider.parse_keys(|text| text.parse().ok());
    }
    let provider = provider.build();
    let mut caches = Vec::new();
    for _ in 0..INSTANCES {
        let mut cache = Cache::builder(provider.clone()).store(db.store_with(mode, fill).await);
        if calls == Calls::Shared {
            let budget = db.budget(Quota::per_second(NonZeroU32::new(50).unwrap()));
            cache = cache.fleet_rate_limit(budget.await);
        }
        caches.push(cache.build().unwrap());
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut asked = HashSet::new();
    // One fill per instance first (a key of its own): from then on its
    // reads claim what they miss themselves (see `PgStore`'s protocol).
    for (i, cache) in caches.iter().enumerate() {
        let key = KEY_SPACE + 1 + i as u64;
        assert_eq!(
            cache.loader().load(key).await.unwrap(),
            Some(value_of(&key))
        );
        asked.insert(key);
    }
    let barrier = Arc::new(Barrier::new(INSTANCES * LOADERS));
    let mut tasks = Vec::new();
    for cache in &caches {
        for _ in 0..LOADERS {
            let keys = zipf_keys(&mut rng, KEYS_PER_LOADER);
            asked.extend(keys.iter().copied());
            // Under the budget, loads arrive over the first 400 ms, while
            // calls wait for their turns (one each 20 ms).
            let arrival = match calls {
                Calls::Own => Duration::ZERO,
                Calls::Shared => Duration::from_millis(rng.gen_range(0..400)),
            };
            let (cache, barrier) = (cache.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                tokio::time::sleep(arrival).await;
                let loader = cache.loader();
                let got = loader.load_many(keys.clone()).await?;
                for key in &keys {
                    assert_eq!(got[key], value_of(key));
                }
                Ok::<_, loadlock::Error>(())
            }));
        }
    }
    for task in join_all(tasks).await {
        task.unwrap().unwrap();
    }

    let fetched = provider.keys_fetched();
    let per_key = provider.fetches_per_key();
    let provider_keys: u64 = caches.iter().map(|c| c.stats().provider_keys).sum();
    let loads: u64 = caches.iter().map(|c| c.stats().loads).sum();
    eprintln!(
        "{mode:?}: {loads} loads, {} distinct keys, {fetched} keys fetched in {} calls: \
         provider keys / distinct = {:.3}",
        asked.len(),
        provider.call_count(),
        fetched as f64 / asked.len() as f64
    );
    assert_eq!(fetched, asked.len(), "provider keys == distinct keys asked");
    assert_eq!(provider_keys as usize, asked.len());
    assert!(per_key.values().all(|&n| n == 1));
    assert_eq!(per_key.keys().copied().collect::<HashSet<_>>(), asked);
    // Every lease was published or released (leases a read claimed for a
    // batch that then joined another's fill are released in the
    // background, soon after).
    let leases = format!(
        "SELECT count(*) FROM {} WHERE lease_token IS NOT NULL",
        db.table()
    );
    let pool = db.pool(1).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(leases.as_str()))
            .fetch_one(&pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} leases still held 10 s after every load returned"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if calls == Calls::Shared {
        // Calls that waited for their turn carried keys that joined them.
        let carried: u64 = caches.iter().map(|c| c.stats().carried_keys).sum();
        eprintln!("{carried} keys carried by calls they joined");
        assert!(carried > 0, "no keys counted as carried");
        assert_eq!(
            db.open_calls().await,
            0,
            "calls still open after every load returned"
        );
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_per_key_locks() {
    exactly_once_across_instances(LockMode::PerKey, FillMode::Lease, "once_perkey", Calls::Own)
        .await;
}

/// The same under a fleet budget that binds (50 calls/s), the calls that
/// wait for their turns carrying keys other instances joined to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_sharing_calls() {
    exactly_once_across_instances(
        LockMode::PerKey,
        FillMode::Lease,
        "once_shared",
        Calls::Shared,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_held_transactions() {
    exactly_once_across_instances(
        LockMode::PerKey,
        FillMode::HeldTransaction,
        "once_held",
        Calls::Own,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_namespace_lock() {
    exactly_once_across_instances(
        LockMode::Namespace,
        FillMode::HeldTransaction,
        "once_ns",
        Calls::Own,
    )
    .await;
}

/// 8 instances fill 8 disjoint key sets with a 200 ms provider: with per-key
/// locks the fills overlap; with the namespace lock they run one at a time.
async fn disjoint_fills(mode: LockMode, tag: &str) -> Duration {
    const INSTANCES: u64 = 8;
    let db = TestDb::new(tag).await;
    let provider = Fake::<u64>::builder(format!("fleet/{tag}"))
        .delay(Duration::from_millis(200))
        .build();
    let mut caches = Vec::new();
    for _ in 0..INSTANCES {
        caches.push(
            Cache::builder(provider.clone())
                .store(db.store(mode).await)
                .build()
                .unwrap(),
        );
    }
    let barrier = Arc::new(Barrier::new(INSTANCES as usize + 1));
    let tasks: Vec<_> = caches
        .iter()
        .enumerate()
        .map(|(i, cache)| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            let keys: Vec<u64> = (i as u64 * 100..i as u64 * 100 + 10).collect();
            tokio::spawn(async move {
                barrier.wait().await;
                cache.loader().load_many(keys).await
            })
        })
        .collect();
    barrier.wait().await;
    let started = Instant::now();
    for task in join_all(tasks).await {
        assert_eq!(task.unwrap().unwrap().len(), 10);
    }
    let elapsed = started.elapsed();
    assert_eq!(provider.call_count(), INSTANCES as usize);
    db.cleanup().await;
    elapsed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_fills_run_concurrently_with_per_key_locks() {
    let elapsed = disjoint_fills(LockMode::PerKey, "disjoint_perkey").await;
    eprintln!("PerKey: 8 disjoint fills of a 200 ms provider took {elapsed:?}");
    // Serialized would be at least 8 x 200 ms.
    assert!(elapsed < Duration::from_millis(4 * 200), "{elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn disjoint_fills_run_serially_with_the_namespace_lock() {
    let elapsed = disjoint_fills(LockMode::Namespace, "disjoint_ns").await;
    eprintln!("Namespace: 8 disjoint fills of a 200 ms provider took {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(8 * 200), "{elapsed:?}");
}

/// Two instances load overlapping key sets in opposite orders, 200 rounds:
/// never a deadlock (or any other error), each key fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn opposite_orders_never_deadlock() {
    let db = TestDb::new("deadlock").await;
    let provider = Fake::<u64>::builder("fleet/deadlock")
        .delay(Duration::from_millis(1))
        .build();
    let a = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let b = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    for round in 0..200u64 {
        let base = round * 100;
        let forward: Vec<u64> = (base..base + 20).collect();
        let backward: Vec<u64> = (base + 5..base + 25).rev().collect();
        let (la, lb) = (a.loader(), b.loader());
        let (x, y) = tokio::join!(la.load_many(forward), lb.load_many(backward));
        x.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        y.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    }
    let per_key = provider.fetches_per_key();
    assert_eq!(per_key.len(), 200 * 25);
    assert!(per_key.values().all(|&n| n == 1));
    db.cleanup().await;
}

/// A provider shared by separate processes: appends every fetched key to a
/// file (one `write` per call, `O_APPEND`), so the parent can count them.
struct FileCountingProvider {
    log: Mutex<std::fs::File>,
}

#[async_trait::async_trait]
impl BatchFetch for FileCountingProvider {
    type Key = u64;
    type Value = String;
    type Error = std::io::Error;

    fn namespace(&self) -> &str {
        "fleet/processes"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, std::io::Error> {
        let lines: String = keys.iter().map(|k| format!("{k}\n")).collect();
        self.log.lock().unwrap().write_all(lines.as_bytes())?;
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(keys.iter().map(|k| (*k, value_of(k))).collect())
    }
}

const PROCESSES: usize = 4;
const CHILD_ENV: &str = "LOADLOCK_FLEET_CHILD";

/// The same property across 4 OS processes: this test runs itself 4 times as
/// children (each a separate instance sharing one table), then counts what
/// the shared provider log says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_processes() {
    across_processes("exactly_once_across_processes", FillMode::Lease).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exactly_once_across_processes_held_transactions() {
    across_processes(
        "exactly_once_across_processes_held_transactions",
        FillMode::HeldTransaction,
    )
    .await;
}

/// Runs the processes test `test` (this function, in every child too).
async fn across_processes(test: &str, fill: FillMode) {
    if let Ok(role) = std::env::var(CHILD_ENV) {
        return child(role.parse().unwrap(), fill).await;
    }
    let db = TestDb::new("processes").await;
    db.store(LockMode::PerKey).await; // migrate once up front
    let dir = std::env::temp_dir().join(format!("loadlock-fleet-{}", db.schema));
    std::fs::create_dir_all(&dir).unwrap();

    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..PROCESSES)
        .map(|i| {
            std::process::Command::new(&exe)
                .args(["--exact", test, "--nocapture"])
                .env(CHILD_ENV, i.to_string())
                .env("LOADLOCK_FLEET_URL", &db.url)
                .env("LOADLOCK_FLEET_TABLE", db.table())
                .env("LOADLOCK_FLEET_DIR", &dir)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn child")
        })
        .collect();
    // Start them together once all are ready.
    let started = Instant::now();
    while (0..PROCESSES).any(|i| !dir.join(format!("ready-{i}")).exists()) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "children not ready"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    std::fs::write(dir.join("go"), b"").unwrap();
    for child in children {
        let output = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        assert!(
            output.status.success(),
            "child failed: {}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }

    let read_keys = |path: PathBuf| -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    };
    let fetched = read_keys(dir.join("fetched"));
    let mut asked = HashSet::new();
    for i in 0..PROCESSES {
        asked.extend(read_keys(dir.join(format!("asked-{i}"))));
    }
    let distinct_fetched: HashSet<u64> = fetched.iter().copied().collect();
    eprintln!(
        "{PROCESSES} processes: {} distinct keys asked, {} fetched: ratio {:.3}",
        asked.len(),
        fetched.len(),
        fetched.len() as f64 / asked.len() as f64
    );
    assert_eq!(fetched.len(), asked.len(), "each distinct key fetched once");
    assert_eq!(distinct_fetched, asked);
    let _ = std::fs::remove_dir_all(&dir);
    db.cleanup().await;
}

async fn child(index: usize, fill: FillMode) {
    let url = std::env::var("LOADLOCK_FLEET_URL").unwrap();
    let table = std::env::var("LOADLOCK_FLEET_TABLE").unwrap();
    let dir = PathBuf::from(std::env::var("LOADLOCK_FLEET_DIR").unwrap());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&url)
        .await
        .unwrap();
    let store = PgStore::builder(pool)
        .table(table)
        .fill_mode(fill)
        .build()
        .unwrap();
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fetched"))
        .unwrap();
    let cache = Cache::builder(FileCountingProvider {
        log: Mutex::new(log),
    })
    .store(store)
    .build()
    .unwrap();

    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 + index as u64);
    let requests: Vec<Vec<u64>> = (0..32).map(|_| zipf_keys(&mut rng, 25)).collect();
    let asked: String = requests
        .iter()
        .flatten()
        .map(|k| format!("{k}\n"))
        .collect();
    std::fs::write(dir.join(format!("asked-{index}")), asked).unwrap();

    std::fs::write(dir.join(format!("ready-{index}")), b"").unwrap();
    wait_for_file(&dir.join("go")).await;
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|keys| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load_many(keys).await })
        })
        .collect();
    for task in join_all(tasks).await {
        task.unwrap().unwrap();
    }
}

async fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no go signal");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
