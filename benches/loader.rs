//! The in-process path: memo hits, coalescing and batching, store hits, with
//! an instant provider, so what is measured is loadlock's own overhead.
//!
//! ```text
//! cargo bench --bench loader
//! ```

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, Criterion};
use futures::future::join_all;
use loadlock::{BatchFetch, Cache};

struct Echo;

#[async_trait::async_trait]
impl BatchFetch for Echo {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "bench/echo"
    }

    fn max_batch_size(&self) -> usize {
        1000
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }
}

fn in_process(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("in_process");

    // 1,000 concurrent loads over 100 distinct keys, a fresh cache each time:
    // dedup in the memo, one batch, one provider call.
    group.bench_function("1000_loads_100_keys_cold", |b| {
        b.to_async(&rt).iter(|| async {
            let cache = Cache::builder(Echo).build().unwrap();
            let loader = cache.loader();
            let results = join_all((0..1000u64).map(|i| loader.load(i % 100))).await;
            assert_eq!(results.len(), 1000);
        })
    });

    // 10,000 loads that are all memo hits.
    let cache = Cache::builder(Echo).build().unwrap();
    let warm = cache.loader();
    rt.block_on(warm.load_many(0..100)).unwrap();
    group.bench_function("10000_memo_hits", |b| {
        b.to_async(&rt).iter(|| async {
            let results = join_all((0..10_000u64).map(|i| warm.load(i % 100))).await;
            assert_eq!(results.len(), 10_000);
        })
    });

    // A new request's loader, 100 keys, all fresh in the MemoryStore.
    group.bench_function("100_store_hits_new_loader", |b| {
        b.to_async(&rt).iter(|| async {
            let got = cache.loader().load_many(0..100).await.unwrap();
            assert_eq!(got.len(), 100);
        })
    });
    group.finish();
}

criterion_group!(benches, in_process);
criterion_main!(benches);
