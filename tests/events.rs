//! Invalidation events across instances (LISTEN/NOTIFY, or in process for
//! MemoryStore), the process-local tier they evict, and what happens when
//! the event connection is lost.

mod support;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use loadlock::{BatchFetch, Cache, Invalidation, LockMode, MemoryStore, PgStore, Store};
use sqlx::{Connection, PgConnection};
use support::pg::TestDb;

/// A provider answering each key's current version in a shared source.
#[derive(Clone, Default)]
struct Versions {
    source: Arc<Mutex<HashMap<u64, u64>>>,
    calls: Arc<Mutex<usize>>,
}

impl Versions {
    fn bump(&self, key: u64) -> u64 {
        let mut source = self.source.lock().unwrap();
        let v = source.entry(key).or_insert(1);
        *v += 1;
        *v
    }
}

#[async_trait::async_trait]
impl BatchFetch for Versions {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "events/versions"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        *self.calls.lock().unwrap() += 1;
        let source = self.source.lock().unwrap();
        Ok(keys
            .iter()
            .map(|k| (*k, *source.get(k).unwrap_or(&1)))
            .collect())
    }
}

/// Waits until `store`'s listener is listening.
async fn wait_for_listener(url: &str, store: &PgStore) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let started = Instant::now();
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE application_name = 'loadlock-listener' AND query LIKE '%' || $1 || '%'",
        )
        .bind(store.event_channel())
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if listening > 0 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no listener");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Loads `key` on `cache` until it answers `want`; returns how long it took.
async fn until_fresh(cache: &Cache<Versions>, key: u64, want: u64, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if cache.loader().load(key).await.unwrap() == Some(want) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "still stale after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalidation_evicts_other_instances_local_tiers() {
    let db = TestDb::new("events_local").await;
    let source = Versions::default();
    let a = Cache::builder(source.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let b_store = db.store(LockMode::PerKey).await;
    let b = Cache::builder(source.clone())
        .store(b_store.clone())
        .local_tier(1000, Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = b.invalidations();
    wait_for_listener(&db.url, &b_store).await;
    // The listener announces that it is listening (anything cached before
    // may have missed events) with Missed; let the local tier see it first.
    let first = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    assert_eq!(first.unwrap(), Some(Invalidation::Missed));
    tokio::time::sleep(Duration::from_millis(100)).await;

    assert_eq!(b.loader().load(7).await.unwrap(), Some(1));
    assert_eq!(b.loader().load(7).await.unwrap(), Some(1));
    assert_eq!(
        b.stats().local_hits,
        1,
        "the second load came from the local tier"
    );
    assert_eq!(b.local_len(), 1);

    let v2 = source.bump(7);
    a.invalidate([7]).await.unwrap();
    let took = until_fresh(&b, 7, v2, Duration::from_secs(1)).await;
    eprintln!("B's local tier evicted {took:?} after A's invalidation returned");

    // Kill B's listener connection. A change made meanwhile without any
    // event (a tombstone written by hand) must not stay hidden behind B's
    // local tier: B flushes it when its listener reconnects.
    let mut admin = PgConnection::connect(&db.url).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'loadlock-listener' AND query LIKE '%' || $1 || '%') k",
    )
    .bind(b_store.event_channel())
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert_eq!(killed, 1);
    let v3 = source.bump(7);
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET expires_at = '-infinity' WHERE namespace = 'events/versions' AND key = '7'",
        db.table()
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    let took = until_fresh(&b, 7, v3, Duration::from_secs(10)).await;
    eprintln!(
        "after its listener was killed, B served the change {took:?} later (local tier flushed)"
    );
    wait_for_listener(&db.url, &b_store).await;

    // And it keeps working: events flow again.
    let v4 = source.bump(7);
    a.invalidate([7]).await.unwrap();
    until_fresh(&b, 7, v4, Duration::from_secs(5)).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_thousand_invalidated_keys_are_all_announced() {
    let db = TestDb::new("events_10k").await;
    let source = Versions::default();
    let a = Cache::builder(source.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let b_store = db.store(LockMode::PerKey).await;
    let b = Cache::builder(source.clone())
        .store(b_store.clone())
        .build()
        .unwrap();
    let mut events = b.invalidations();
    wait_for_listener(&db.url, &b_store).await;

    let keys: Vec<u64> = (0..10_000).collect();
    a.invalidate(keys.clone()).await.unwrap();
    let mut seen = HashSet::new();
    let mut messages = 0;
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    while seen.len() < keys.len() {
        tokio::select! {
            event = events.next() => match event.expect("stream open") {
                Invalidation::Keys(batch) => {
                    messages += 1;
                    seen.extend(batch.into_iter().map(|k| k.parse::<u64>().unwrap()));
                }
                // Once listening, the listener says events may have been
                // missed before; the test's keys come after that.
                Invalidation::Missed => {}
                other => panic!("unexpected {other:?}"),
            },
            _ = &mut deadline => panic!("only {} of 10,000 keys announced", seen.len()),
        }
    }
    eprintln!("10,000 invalidated keys arrived in {messages} events");
    assert!(messages > 1, "chunked");
    assert_eq!(seen, keys.into_iter().collect());
    db.cleanup().await;
}

/// The same in one process: caches sharing a MemoryStore evict each other's
/// local tiers, and the stream reports invalidations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_events_are_in_process() {
    let store = MemoryStore::new();
    let source = Versions::default();
    let a = Cache::builder(source.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let b = Cache::builder(source.clone())
        .store(store.clone())
        .local_tier(100, Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = b.invalidations();
    assert_eq!(b.loader().load(1).await.unwrap(), Some(1));
    assert_eq!(b.loader().load(1).await.unwrap(), Some(1));
    assert_eq!(b.stats().local_hits, 1);
    let v2 = source.bump(1);
    a.invalidate([1]).await.unwrap();
    assert_eq!(
        events.next().await,
        Some(Invalidation::Keys(vec!["1".into()]))
    );
    until_fresh(&b, 1, v2, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_local_tier_needs_a_store_with_events() {
    struct Silent;
    #[async_trait::async_trait]
    impl Store<Versions> for Silent {
        async fn get(
            &self,
            _: &str,
            keys: &[u64],
            _: Duration,
        ) -> Result<Vec<loadlock::store::Lookup<u64>>, loadlock::Error> {
            Ok(vec![loadlock::store::Lookup::Miss; keys.len()])
        }
        async fn fill(
            &self,
            _: loadlock::store::Fill<'_, Versions>,
        ) -> Result<Vec<loadlock::store::Filled<u64>>, loadlock::Error> {
            Ok(Vec::new())
        }
        async fn invalidate(&self, _: &str, _: &[u64]) -> Result<(), loadlock::Error> {
            Ok(())
        }
        async fn put_if_version(
            &self,
            _: &str,
            _: &u64,
            _: u64,
            _: u64,
            _: Duration,
        ) -> Result<u64, loadlock::Error> {
            Ok(0)
        }
        async fn invalidate_namespace(&self, _: &str) -> Result<(), loadlock::Error> {
            Ok(())
        }

        async fn write_locked(
            &self,
            _: &str,
            _: &[u64],
            work: futures::future::BoxFuture<'_, ()>,
        ) -> Result<(), loadlock::Error> {
            work.await;
            Ok(())
        }
    }
    let err = Cache::builder(Versions::default())
        .store(Silent)
        .local_tier(10, Duration::from_secs(1))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("events"), "{err}");
}

/// `Versions` whose fetches wait for a permit.
#[derive(Clone)]
struct Gated {
    versions: Versions,
    gate: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl BatchFetch for Gated {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "events/gated"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        self.gate.acquire().await.unwrap().forget();
        self.versions.fetch(keys).await
    }
}

/// An invalidation of one key does not cost the local tier the inserts in
/// flight of every other key: a fill of key 1 that read the store before
/// key 2 was invalidated still lands in the local tier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_of_other_keys_keeps_a_local_insert() {
    let store = MemoryStore::new();
    let provider = Gated {
        versions: Versions::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let a = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let b = Cache::builder(provider.clone())
        .store(store.clone())
        .local_tier(100, Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = b.invalidations();
    let loading = tokio::spawn({
        let b = b.clone();
        async move { b.loader().load(1).await }
    });
    while *provider.versions.calls.lock().unwrap() == 0 && b.stats().batches == 0 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    a.invalidate([2]).await.unwrap();
    assert_eq!(
        events.next().await,
        Some(Invalidation::Keys(vec!["2".into()]))
    );
    // The tier's own follower has heard it too.
    tokio::time::sleep(Duration::from_millis(50)).await;
    provider.gate.add_permits(1);
    assert_eq!(loading.await.unwrap().unwrap(), Some(1));
    assert_eq!(b.loader().load(1).await.unwrap(), Some(1));
    assert_eq!(b.stats().local_hits, 1, "{:?}", b.stats());
}

/// A subscriber that falls further behind than the store's event buffer
/// is told once with `Missed`, then goes on with the newest events; the
/// stream needs no pinning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_subscriber_is_told_it_missed_events() {
    let store = MemoryStore::new();
    let cache = Cache::builder(Versions::default())
        .store(store)
        .build()
        .unwrap();
    let mut events = cache.invalidations();
    for key in 0..1100u64 {
        cache.invalidate([key]).await.unwrap();
    }
    assert_eq!(events.next().await, Some(Invalidation::Missed));
    // Then the newest events still held, in order.
    let next = events.next().await;
    assert!(
        matches!(&next, Some(Invalidation::Keys(keys)) if keys[0].parse::<u64>().unwrap() >= 76),
        "{next:?}"
    );
    cache.invalidate([5000]).await.unwrap();
    let mut last = None;
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(100), events.next()).await
    {
        last = Some(event);
    }
    assert_eq!(last, Some(Invalidation::Keys(vec!["5000".into()])));
}
