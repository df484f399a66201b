//! loadlock side by side with async-graphql's `DataLoader` on identical
//! in-process workloads, and `PgStore`'s all-hit read next to a hand-written
//! query on the same pool.
//!
//! ```text
//! cargo bench --bench loader
//! ```
//!
//! The Postgres group finds a server as the tests do (`DATABASE_URL`, a
//! local server, or a throwaway cluster).

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use async_graphql::dataloader::{DataLoader, HashMapCache, Loader as GqlLoader};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures::future::join_all;
use loadlock::store::{Fill, Filled, Lookup, Store};
use loadlock::{BatchFetch, Cache, Entry, LockMode};
use sqlx::types::Json;
use sqlx::Row;

/// The same instant provider for both loaders.
#[derive(Clone)]
struct Echo;

#[async_trait::async_trait]
impl BatchFetch for Echo {
    type Key = u64;
    type Value = u64;
    type Error = Infallible;

    fn namespace(&self) -> &str {
        "bench/echo"
    }

    fn max_batch_size(&self) -> usize {
        1000
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Infallible> {
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }
}

impl GqlLoader<u64> for Echo {
    type Value = u64;
    type Error = Infallible;

    async fn load(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Infallible> {
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }
}

/// A store that keeps nothing: what is left of loadlock without tier 2, to
/// tell the store's share of the cold path from the rest.
struct PassThrough;

#[async_trait::async_trait]
impl Store<Echo> for PassThrough {
    async fn get(
        &self,
        _: &str,
        keys: &[u64],
        _: Duration,
    ) -> Result<Vec<Lookup<u64>>, loadlock::Error> {
        Ok(vec![Lookup::Miss; keys.len()])
    }

    async fn fill(&self, fill: Fill<'_, Echo>) -> Result<Vec<Filled<u64>>, loadlock::Error> {
        let mut found = fill.fetch(fill.keys()).await?;
        Ok(fill
            .keys()
            .iter()
            .map(|k| {
                let now = std::time::SystemTime::now();
                Filled::Fetched(found.remove(k).map(|v| Entry::new(v, 0, now, now)))
            })
            .collect())
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

/// One request: 1,000 concurrent loads over 100 keys through a new loader.
async fn thousand_loads(cache: Cache<Echo>) {
    let loader = cache.loader();
    let results = join_all((0..1000u64).map(|i| loader.load(i % 100))).await;
    assert_eq!(results.len(), 1000);
}

/// Runs one request on a task of its own, as a web server runs a handler
/// (both loaders alike).
async fn on_a_task(request: impl std::future::Future<Output = ()> + Send + 'static) {
    tokio::spawn(request).await.unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn in_process(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("in_process");

    // 1,000 concurrent loads over 100 distinct keys, a fresh loader each
    // time (a new request), instant provider. Both with their default window
    // (loadlock 500 µs on tokio's 1 ms timer, async-graphql 1 ms on
    // futures-timer's finer one), both at 1 ms, and both with no window,
    // which leaves only the machinery.
    for window_us in [None, Some(1000u64), Some(0)] {
        let label = window_us.map_or("default window".to_string(), |w| format!("{w} us window"));
        group.bench_function(
            BenchmarkId::new("1000_loads_100_keys/loadlock", &label),
            |b| {
                b.to_async(&rt).iter(|| {
                    on_a_task(async move {
                        let mut builder = Cache::builder(Echo);
                        if let Some(w) = window_us {
                            builder = builder.batch_window(Duration::from_micros(w));
                        }
                        thousand_loads(builder.build().unwrap()).await;
                    })
                })
            },
        );
        group.bench_function(
            BenchmarkId::new("1000_loads_100_keys/async-graphql", &label),
            |b| {
                b.to_async(&rt).iter(|| {
                    on_a_task(async move {
                        let mut loader =
                            DataLoader::with_cache(Echo, tokio::spawn, HashMapCache::default());
                        if let Some(w) = window_us {
                            loader = loader.delay(Duration::from_micros(w));
                        }
                        let results =
                            join_all((0..1000u64).map(|i| loader.load_one(i % 100))).await;
                        assert_eq!(results.len(), 1000);
                    })
                })
            },
        );
    }

    group.bench_function(
        "1000_loads_100_keys/loadlock on an unbounded MemoryStore/0 us window",
        |b| {
            b.to_async(&rt).iter(|| {
                on_a_task(async {
                    let cache = Cache::builder(Echo)
                        .store(loadlock::MemoryStore::unbounded())
                        .batch_window(Duration::ZERO)
                        .build()
                        .unwrap();
                    thousand_loads(cache).await;
                })
            })
        },
    );
    group.bench_function(
        "1000_loads_100_keys/loadlock without a store/0 us window",
        |b| {
            b.to_async(&rt).iter(|| {
                on_a_task(async {
                    let cache = Cache::builder(Echo)
                        .store(PassThrough)
                        .batch_window(Duration::ZERO)
                        .build()
                        .unwrap();
                    thousand_loads(cache).await;
                })
            })
        },
    );

    // 10,000 loads, all memo hits, on a warm loader.
    let cache = Cache::builder(Echo).build().unwrap();
    let warm = cache.loader();
    rt.block_on(warm.load_many(0..100)).unwrap();
    group.bench_function("10000_memo_hits/loadlock", |b| {
        b.to_async(&rt).iter(|| {
            let warm = warm.clone();
            on_a_task(async move {
                let results = join_all((0..10_000u64).map(|i| warm.load(i % 100))).await;
                assert_eq!(results.len(), 10_000);
            })
        })
    });
    let gql = std::sync::Arc::new(DataLoader::with_cache(
        Echo,
        tokio::spawn,
        HashMapCache::default(),
    ));
    rt.block_on(gql.load_many(0..100u64)).unwrap();
    group.bench_function("10000_memo_hits/async-graphql", |b| {
        b.to_async(&rt).iter(|| {
            let gql = gql.clone();
            on_a_task(async move {
                let results = join_all((0..10_000u64).map(|i| gql.load_one(i % 100))).await;
                assert_eq!(results.len(), 10_000);
            })
        })
    });
    group.finish();
}

#[derive(Clone)]
struct Users;

#[async_trait::async_trait]
impl BatchFetch for Users {
    type Key = u64;
    type Value = String;
    type Error = Infallible;

    fn namespace(&self) -> &str {
        "bench/users"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, Infallible> {
        Ok(keys
            .iter()
            .map(|&k| (k, format!("user {k} with a name")))
            .collect())
    }
}

fn postgres(c: &mut Criterion) {
    let rt = runtime();
    let (db, store) = rt.block_on(async {
        let db = pg::TestDb::new("bench").await;
        let store = db.store(LockMode::PerKey).await;
        (db, store)
    });
    let keys: Vec<u64> = (0..100).collect();
    let texts: Vec<String> = keys.iter().map(u64::to_string).collect();
    // Fill the 100 keys once.
    let cache = Cache::builder(Users)
        .store(store.clone())
        .batch_window(Duration::ZERO)
        .build()
        .unwrap();
    rt.block_on(cache.loader().load_many(keys.clone())).unwrap();

    let mut group = c.benchmark_group("pg_all_hit_100");
    group.bench_function("PgStore::get", |b| {
        b.to_async(&rt).iter(|| async {
            let found = Store::<Users>::get(&store, "bench/users", &keys, Duration::ZERO)
                .await
                .unwrap();
            assert!(matches!(found[99], Lookup::Hit(_)));
        })
    });
    let pool = store.pool().clone();
    let table = db.table();
    let sql = format!(
        "SELECT key, value FROM {table} WHERE namespace = $1 AND key = ANY($2) AND expires_at > now()"
    );
    group.bench_function("hand-written SELECT", |b| {
        b.to_async(&rt).iter(|| async {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
                .bind("bench/users")
                .bind(&texts)
                .fetch_all(&pool)
                .await
                .unwrap();
            let values: HashMap<String, String> = rows
                .iter()
                .map(|row| {
                    let Json(value): Json<String> = row.get(1);
                    (row.get(0), value)
                })
                .collect();
            assert_eq!(values.len(), 100);
        })
    });
    group.bench_function("Loader::load_many (window 0)", |b| {
        b.to_async(&rt).iter(|| async {
            let got = cache
                .loader()
                .load_many(keys.iter().copied())
                .await
                .unwrap();
            assert_eq!(got.len(), 100);
        })
    });
    group.finish();
    rt.block_on(db.cleanup());
}

criterion_group!(benches, in_process, postgres);
criterion_main!(benches);
