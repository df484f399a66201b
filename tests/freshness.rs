//! Stale-while-revalidate and stale-if-error (RFC 5861 semantics).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use loadlock::{BatchFetch, Cache, Error, LockMode, MemoryStore};
use support::pg::TestDb;

/// Answers the current generation for every key; counts calls; can be told
/// to fail.
#[derive(Clone, Default)]
struct Generations {
    generation: Arc<AtomicU64>,
    calls: Arc<AtomicUsize>,
    failing: Arc<AtomicUsize>,
    delay: Duration,
}

#[derive(Debug)]
struct Down;

impl std::fmt::Display for Down {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("provider down")
    }
}

impl std::error::Error for Down {}

#[async_trait::async_trait]
impl BatchFetch for Generations {
    type Key = u64;
    type Value = u64;
    type Error = Down;

    fn namespace(&self) -> &str {
        "freshness/generations"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Down> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        if self.failing.load(Ordering::SeqCst) > 0 {
            return Err(Down);
        }
        let g = self.generation.load(Ordering::SeqCst);
        Ok(keys.iter().map(|&k| (k, g)).collect())
    }
}

/// After expiry, within the grace: 64 concurrent loads on two instances all
/// return the old value at once, and exactly one provider call renews it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_serves_at_once_and_refreshes_once() {
    let db = TestDb::new("swr").await;
    let provider = Generations {
        delay: Duration::from_secs(2),
        ..Generations::default()
    };
    provider.generation.store(1, Ordering::SeqCst);
    let mut caches = Vec::new();
    for _ in 0..2 {
        caches.push(
            Cache::builder(provider.clone())
                .store(db.store(LockMode::PerKey).await)
                .ttl(Duration::from_secs(3))
                .stale_while_revalidate(Duration::from_secs(60))
                .build()
                .unwrap(),
        );
    }
    assert_eq!(caches[0].loader().load(5).await.unwrap(), Some(1));
    assert_eq!(provider.calls.load(Ordering::SeqCst), 1);

    tokio::time::sleep(Duration::from_millis(3100)).await;
    provider.generation.store(2, Ordering::SeqCst);
    let loads = (0..64).map(|i| {
        let cache = caches[i % 2].clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let got = cache.loader().load(5).await.unwrap();
            (got, started.elapsed())
        })
    });
    for load in join_all(loads).await {
        let (got, took) = load.unwrap();
        assert_eq!(got, Some(1), "the stale value, at once");
        assert!(
            took < Duration::from_secs(1),
            "not waiting for the 2 s provider: {took:?}"
        );
    }

    // The refresh lands; exactly one provider call made it.
    let started = Instant::now();
    while caches[1].loader().load(5).await.unwrap() != Some(2) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never refreshed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(provider.calls.load(Ordering::SeqCst), 2, "one refresh call");
    // The refresh task counts what it renewed once its publish has
    // answered, which may come just after a load saw the new value.
    let counting = Instant::now();
    let refreshes = loop {
        let refreshes: u64 = caches.iter().map(|c| c.stats().refreshes).sum();
        if refreshes > 0 || counting.elapsed() > Duration::from_secs(10) {
            break refreshes;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let stale: u64 = caches.iter().map(|c| c.stats().stale_served).sum();
    assert_eq!(refreshes, 1);
    assert!(stale >= 64, "{stale}");
    db.cleanup().await;
}

/// Within stale-if-error, a failing provider serves the old value; past it,
/// the failure is returned.
#[tokio::test(start_paused = true)]
async fn stale_if_error_serves_the_old_value_until_the_grace_ends() {
    let provider = Generations::default();
    provider.generation.store(1, Ordering::SeqCst);
    let cache = Cache::builder(provider.clone())
        .store(MemoryStore::new())
        .ttl(Duration::from_secs(10))
        .stale_if_error(Duration::from_secs(30))
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));

    tokio::time::advance(Duration::from_secs(11)).await;
    provider.failing.store(1, Ordering::SeqCst);
    assert_eq!(
        cache.loader().load(1).await.unwrap(),
        Some(1),
        "stale on error"
    );
    assert_eq!(cache.stats().stale_served, 1);
    assert_eq!(
        provider.calls.load(Ordering::SeqCst),
        2,
        "the refill was tried"
    );

    tokio::time::advance(Duration::from_secs(30)).await;
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(
        matches!(err, Error::Provider { .. }),
        "past the grace: {err:?}"
    );

    // And without the error, the refill simply succeeds.
    provider.failing.store(0, Ordering::SeqCst);
    provider.generation.store(2, Ordering::SeqCst);
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(2));
}

/// The same on Postgres, where the database clock decides (real time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_on_postgres() {
    let db = TestDb::new("sie").await;
    let provider = Generations::default();
    provider.generation.store(1, Ordering::SeqCst);
    let cache = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(2))
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    provider.failing.store(1, Ordering::SeqCst);
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(cache.loader().load(1).await.is_err(), "past the grace");
    db.cleanup().await;
}

/// An invalidated entry is never served stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_entries_are_never_served_stale() {
    let db = TestDb::new("swr_inval").await;
    let provider = Generations::default();
    provider.generation.store(1, Ordering::SeqCst);
    let cache = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .stale_while_revalidate(Duration::from_secs(60))
        .stale_if_error(Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    provider.generation.store(2, Ordering::SeqCst);
    cache.invalidate([1]).await.unwrap();
    provider.failing.store(1, Ordering::SeqCst);
    assert!(cache.loader().load(1).await.is_err(), "no stale fallback");
    provider.failing.store(0, Ordering::SeqCst);
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(2));
    assert_eq!(cache.stats().stale_served, 0);
    db.cleanup().await;
}

/// A refill that waited for the key's lock while an invalidation held it
/// must not fall back to the stale entry when the provider then fails: the
/// entry was invalidated meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_if_error_honours_an_invalidation_that_came_in_meanwhile() {
    use sqlx::{Connection, PgConnection};
    let db = TestDb::new("sie_inval").await;
    let provider = Generations::default();
    provider.generation.store(1, Ordering::SeqCst);
    let cache = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .ttl(Duration::from_secs(1))
        .stale_if_error(Duration::from_secs(60))
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    provider.failing.store(1, Ordering::SeqCst);

    // Hold the key's lock as an invalidation would.
    let id = loadlock::store::lock_id("freshness/generations", "1");
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(id)
        .execute(&mut *tx)
        .await
        .unwrap();
    let load = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(1).await }
    });
    // Wait until the load's refill waits for the lock.
    let mut watcher = PgConnection::connect(&db.url).await.unwrap();
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND ((classid::bigint << 32) | objid::bigint) = $1",
        )
        .bind(id)
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting > 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the refill never waited"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The invalidation: a tombstone, committed while the refill waits.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET value = NULL, expires_at = '-infinity' \
         WHERE namespace = 'freshness/generations' AND key = '1'",
        db.table()
    )))
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let result = load.await.unwrap();
    assert!(
        result.is_err(),
        "no stale fallback after the invalidation: {result:?}"
    );
    assert_eq!(cache.stats().stale_served, 0);
    db.cleanup().await;
}

/// A shared `MemoryStore` seen by the failing instance: its first fill lets
/// another instance refill the key before its own provider fails, and the
/// read that follows a failed fill can be held until the test lets it go.
#[derive(Clone)]
struct RefilledMeanwhile {
    inner: MemoryStore,
    other: Cache<Generations>,
    refill_first: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<std::sync::atomic::AtomicBool>,
    reading_after_failure: Arc<tokio::sync::Semaphore>,
    release_read: Arc<tokio::sync::Semaphore>,
}

#[async_trait::async_trait]
impl loadlock::Store<Generations> for RefilledMeanwhile {
    async fn get(
        &self,
        namespace: &str,
        keys: &[u64],
        grace: Duration,
    ) -> Result<Vec<loadlock::store::Lookup<u64>>, Error> {
        if self.failed.swap(false, Ordering::SeqCst) {
            self.reading_after_failure.add_permits(1);
            self.release_read.acquire().await.unwrap().forget();
        }
        loadlock::Store::<Generations>::get(&self.inner, namespace, keys, grace).await
    }

    async fn fill(
        &self,
        fill: loadlock::store::Fill<'_, Generations>,
    ) -> Result<Vec<loadlock::store::Filled<u64>>, Error> {
        if self.refill_first.swap(false, Ordering::SeqCst) {
            self.other.loader().load(1).await.unwrap();
        }
        let filled = loadlock::Store::<Generations>::fill(&self.inner, fill).await;
        let failed = filled.as_ref().map_or(true, |answers| {
            answers
                .iter()
                .any(|a| matches!(a, loadlock::store::Filled::Failed(_)))
        });
        if failed {
            self.failed.store(true, Ordering::SeqCst);
        }
        filled
    }

    async fn invalidate(&self, namespace: &str, keys: &[u64]) -> Result<(), Error> {
        loadlock::Store::<Generations>::invalidate(&self.inner, namespace, keys).await
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        loadlock::Store::<Generations>::invalidate_namespace(&self.inner, namespace).await
    }

    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[u64],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error> {
        loadlock::Store::<Generations>::write_locked(&self.inner, namespace, keys, work).await
    }

    async fn put_if_version(
        &self,
        namespace: &str,
        key: &u64,
        expected: u64,
        value: u64,
        ttl: Duration,
    ) -> Result<u64, Error> {
        loadlock::Store::<Generations>::put_if_version(
            &self.inner,
            namespace,
            key,
            expected,
            value,
            ttl,
        )
        .await
    }
}

/// The edges of stale-if-error after a failed refill: a key another
/// instance refilled meanwhile is answered with that fresh value (not the
/// error, not the stale one); stale answers count as store hits, as `Stats`
/// says; and while the fallback read runs, no load joins the failed fill's
/// keys (it reads the store and fills them itself).
#[tokio::test(start_paused = true)]
async fn stale_if_error_answers_what_another_instance_refilled_meanwhile() {
    let inner = MemoryStore::new();
    let good = Generations::default();
    good.generation.store(1, Ordering::SeqCst);
    let other = Cache::builder(good.clone())
        .store(inner.clone())
        .ttl(Duration::from_secs(10))
        .build()
        .unwrap();
    other.loader().load_many([1, 2]).await.unwrap();
    tokio::time::advance(Duration::from_secs(11)).await;
    good.generation.store(2, Ordering::SeqCst);

    let failing = Generations::default();
    failing.failing.store(1, Ordering::SeqCst);
    let store = RefilledMeanwhile {
        inner: inner.clone(),
        other: other.clone(),
        refill_first: Arc::new(true.into()),
        failed: Arc::new(false.into()),
        reading_after_failure: Arc::new(tokio::sync::Semaphore::new(0)),
        release_read: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let cache = Cache::builder(failing.clone())
        .store(store.clone())
        .ttl(Duration::from_secs(10))
        .stale_if_error(Duration::from_secs(60))
        .build()
        .unwrap();
    // Key 1 is refilled by the other instance while this one's refill
    // fails; key 2 is still only stale; key 3 was never loaded.
    let loading = tokio::spawn({
        let cache = cache.clone();
        async move {
            let loader = cache.loader();
            tokio::join!(loader.load_many([1, 2]), loader.load(3))
        }
    });
    store
        .reading_after_failure
        .acquire()
        .await
        .unwrap()
        .forget();
    // The fallback read is under way, and the provider is back: a new load
    // of a failed key does not join the failed fill; it reads the store
    // and fills the key itself.
    failing.failing.store(0, Ordering::SeqCst);
    failing.generation.store(3, Ordering::SeqCst);
    let late = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(3).await }
    });
    let late = tokio::time::timeout(Duration::from_secs(5), late)
        .await
        .expect("a new load does not join the failed fill's keys");
    assert_eq!(late.unwrap().unwrap(), Some(3), "filled afresh");
    store.release_read.add_permits(1);
    let (got, three) = loading.await.unwrap();
    let got = got.unwrap();
    assert_eq!(got[&1], 2, "the fresh value another instance wrote");
    assert_eq!(got[&2], 1, "the stale value");
    assert!(three.is_err(), "no stale value to fall back on: {three:?}");
    let stats = cache.stats();
    assert_eq!(stats.coalesced, 0, "{stats:?}");
    assert_eq!(stats.stale_served, 1, "{stats:?}");
    // Key 1 and key 2 of the fallback read; the first read found only stale
    // entries and misses.
    assert_eq!(
        stats.store_hits, 2,
        "served answers are store hits: {stats:?}"
    );
}
