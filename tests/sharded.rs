//! `ShardedStore` over `PgStore`s on two separate Postgres servers: the
//! shared test server and a cluster of the test's own.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::future::join_all;
use loadlock::store::ShardedStore;
use loadlock::{Cache, Error, PgStore};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection};
use support::pg::{PrivateCluster, TestDb};
use support::{value_of, Fake};

/// A store on `url`'s table `table`, on a pool that gives up on an
/// unreachable server within a second.
async fn store(url: &str, table: &str) -> PgStore {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(1))
        .connect_lazy(url)
        .unwrap();
    let store = PgStore::builder(pool)
        .table(table)
        .query_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// One instance's sharded store: shard `a` on the shared server, `b` on
/// the private cluster.
async fn sharded(db: &TestDb, private: &PrivateCluster) -> ShardedStore<PgStore> {
    ShardedStore::new([
        ("a", store(&db.url, &db.table()).await),
        ("b", store(&private.url(), "sharded_cache").await),
    ])
    .unwrap()
}

async fn rows(url: &str, table: &str, namespace: &str) -> i64 {
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {table} WHERE namespace = $1 AND expires_at > now()"
    )))
    .bind(namespace)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_on_two_servers() {
    const INSTANCES: usize = 8;
    const LOADERS: usize = 64;
    let db = TestDb::new("sharded_fleet").await;
    let private = PrivateCluster::start();
    let namespace = "sharded/fleet";
    let provider = Fake::<u64>::builder(namespace)
        .delay(Duration::from_millis(5))
        .build();
    let mut caches = Vec::new();
    for _ in 0..INSTANCES {
        caches.push(
            Cache::builder(provider.clone())
                .store(sharded(&db, &private).await)
                .build()
                .unwrap(),
        );
    }
    let asked = support::zipf_fleet(&caches, 7).await;
    let per_key = provider.fetches_per_key();
    eprintln!(
        "2 shards, {INSTANCES} instances x {LOADERS} loaders: {} distinct keys, {} fetched: {:.3}",
        asked.len(),
        provider.keys_fetched(),
        provider.keys_fetched() as f64 / asked.len() as f64
    );
    assert_eq!(provider.keys_fetched(), asked.len());
    assert!(per_key.values().all(|&n| n == 1));
    // Both servers hold their share, and together every key once.
    let a = rows(&db.url, &db.table(), namespace).await;
    let b = rows(&private.url(), "sharded_cache", namespace).await;
    assert_eq!((a + b) as usize, asked.len());
    let router = sharded(&db, &private).await;
    let on_a = asked
        .iter()
        .filter(|k| router.shard_of(namespace, *k) == 0)
        .count();
    assert_eq!(a as usize, on_a, "each key on the shard it routes to");
    assert!(a > 0 && b > 0, "{a} and {b}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_shard_fails_only_its_keys_and_recovers() {
    let db = TestDb::new("sharded_down").await;
    let private = PrivateCluster::start();
    let namespace = "sharded/down";
    let provider = Fake::<u64>::new(namespace);
    let cache = Cache::builder(provider.clone())
        .store(sharded(&db, &private).await)
        .build()
        .unwrap();
    let router = sharded(&db, &private).await;
    let (on_a, on_b): (Vec<u64>, Vec<u64>) =
        (0..40u64).partition(|k| router.shard_of(namespace, k) == 0);
    assert!(!on_a.is_empty() && !on_b.is_empty());
    cache.loader().load_many(0..20u64).await.unwrap();

    private.stop();
    // One batch of keys on both shards: shard a's are answered (hits and
    // misses alike), shard b's fail fast, naming their shard.
    let loader = cache.loader();
    let started = Instant::now();
    let answers = join_all((0..40u64).map(|k| loader.load(k))).await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    for (key, answer) in (0..40u64).zip(answers) {
        if on_a.contains(&key) {
            assert_eq!(answer.unwrap(), Some(value_of(&key)));
        } else {
            let err = answer.unwrap_err();
            assert!(matches!(err, Error::Store { .. }), "{err:?}");
            assert!(err.to_string().contains("shard b"), "{err}");
        }
    }

    private.start_again();
    // The same cache, without being rebuilt: shard b's keys load again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match cache.loader().load_many(on_b.iter().copied()).await {
            Ok(got) => {
                assert_eq!(got.len(), on_b.len());
                break;
            }
            Err(err) => {
                assert!(
                    Instant::now() < deadline,
                    "shard b did not come back: {err}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidations_reach_their_shard_and_events_merge() {
    let db = TestDb::new("sharded_events").await;
    let private = PrivateCluster::start();
    let namespace = "sharded/events";
    let provider = Fake::<u64>::new(namespace);
    let writer = Cache::builder(provider.clone())
        .store(sharded(&db, &private).await)
        .build()
        .unwrap();
    let reader = Cache::builder(provider.clone())
        .store(sharded(&db, &private).await)
        .build()
        .unwrap();
    let mut events = reader.invalidations();
    writer.loader().load_many(0..10u64).await.unwrap();
    let router = sharded(&db, &private).await;
    let a = (0..10u64)
        .find(|k| router.shard_of(namespace, k) == 0)
        .unwrap();
    let b = (0..10u64)
        .find(|k| router.shard_of(namespace, k) == 1)
        .unwrap();
    writer.invalidate([a, b]).await.unwrap();
    let mut heard = HashSet::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        use futures::StreamExt;
        while heard.len() < 2 {
            match events.next().await {
                Some(loadlock::Invalidation::Keys(keys)) => heard.extend(keys),
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("both shards' events arrive");
    assert_eq!(heard, HashSet::from([a.to_string(), b.to_string()]));
    // Both refetched; the others are still hits.
    reader.loader().load_many(0..10u64).await.unwrap();
    let mut counts = provider.fetches_per_key();
    counts.retain(|_, n| *n > 1);
    assert_eq!(
        counts.keys().copied().collect::<HashSet<_>>(),
        HashSet::from([a, b])
    );
    // A namespace invalidation reaches every shard.
    writer.invalidate_namespace().await.unwrap();
    let before = provider.keys_fetched();
    reader.loader().load_many(0..10u64).await.unwrap();
    assert_eq!(provider.keys_fetched() - before, 10);
    db.cleanup().await;
}

#[tokio::test]
async fn namespace_locks_need_namespace_routing() {
    let db = TestDb::new("sharded_nsmode").await;
    let shards = || async {
        [
            ("a", db.store(loadlock::LockMode::Namespace).await),
            ("b", db.store(loadlock::LockMode::Namespace).await),
        ]
    };
    let err = ShardedStore::new(shards().await)
        .unwrap()
        .migrate()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("route_by_namespace"), "{err}");
    let routed = ShardedStore::new(shards().await)
        .unwrap()
        .route_by_namespace();
    routed.migrate().await.unwrap();
    db.cleanup().await;
}
