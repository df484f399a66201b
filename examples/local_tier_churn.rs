//! The process-local tier under invalidations: how many loads it answers
//! when a share of the operations invalidate random keys.
//!
//! ```text
//! cargo run --release --example local_tier_churn
//! cargo run --release --example local_tier_churn -- 0.05 0.20
//! ```
//!
//! The arguments are the invalidating shares of operations to run (default
//! 0, 0.01, 0.05, 0.20). 32 workers, each making 3,000 operations over
//! 1,000 keys (uniform); a load is a request of its own (a new loader); the
//! provider takes 1 ms. A `MemoryStore` shared by two caches, one with a
//! local tier (whose loads are measured) and one that invalidates.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, Cache, MemoryStore};
use rand::{Rng, SeedableRng};

struct Slow;

#[async_trait::async_trait]
impl BatchFetch for Slow {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "churn"
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }
}

const WORKERS: u64 = 32;
const OPERATIONS: u64 = 3_000;
const KEYS: u64 = 1_000;

async fn run(share: f64) -> (f64, u64, Duration) {
    let store = MemoryStore::new();
    let reader = Cache::builder(Arc::new(Slow))
        .store(store.clone())
        .local_tier(10_000, Duration::from_secs(60))
        .build()
        .expect("cache");
    let writer = Cache::builder(Arc::new(Slow))
        .store(store)
        .build()
        .expect("cache");
    let started = Instant::now();
    let workers = (0..WORKERS).map(|w| {
        let (reader, writer) = (reader.clone(), writer.clone());
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(w);
            for _ in 0..OPERATIONS {
                let key = rng.gen_range(0..KEYS);
                if rng.gen_bool(share) {
                    writer.invalidate([key]).await.expect("invalidate");
                } else {
                    reader.loader().load(key).await.expect("load");
                }
            }
        })
    });
    for worker in futures::future::join_all(workers).await {
        worker.expect("worker");
    }
    let stats = reader.stats();
    (
        stats.local_hits as f64 / stats.loads.max(1) as f64,
        stats.provider_keys,
        started.elapsed(),
    )
}

#[tokio::main]
async fn main() {
    let shares: Vec<f64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a share between 0 and 1"))
        .collect();
    let shares = if shares.is_empty() {
        vec![0.0, 0.01, 0.05, 0.20]
    } else {
        shares
    };
    println!("invalidating share | local-tier hit ratio | provider keys | wall");
    for share in shares {
        let (ratio, keys, wall) = run(share).await;
        println!(
            "{:>18.2} | {:>20.3} | {:>13} | {:.2?}",
            share, ratio, keys, wall
        );
    }
}
