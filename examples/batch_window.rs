//! Measures how the batch window trades latency for batching, to choose the
//! default: requests that spawn 8 tasks at once, each loading 10 keys, on the
//! multi-thread runtime, with an instant provider.
//!
//! ```text
//! cargo run --release --example batch_window
//! ```

use std::collections::HashMap;
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, Cache};

struct Instant0;

#[async_trait::async_trait]
impl BatchFetch for Instant0 {
    type Key = u64;
    type Value = u64;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "window/v1"
    }

    fn max_batch_size(&self) -> usize {
        1000
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }
}

const REQUESTS: u64 = 320;
const TASKS: u64 = 8;
const KEYS: u64 = 10;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!("{REQUESTS} requests x {TASKS} spawned tasks x {KEYS} keys, 2 worker threads");
    println!("(requests run `concurrent` at a time; every key is a miss)\n");
    println!(
        "{:>10} {:>11} {:>16} {:>10} {:>10}",
        "window", "concurrent", "batches/request", "mean ms", "p99 ms"
    );
    for concurrent in [1u64, 16] {
        for micros in [0u64, 50, 200, 500, 1000, 2000, 5000] {
            measure(&runtime, Duration::from_micros(micros), concurrent);
        }
    }
}

fn measure(runtime: &tokio::runtime::Runtime, window: Duration, concurrent: u64) {
    let cache = Cache::builder(Instant0)
        .batch_window(window)
        .build()
        .expect("cache");
    let mut latencies = runtime.block_on(async {
        let mut latencies = Vec::new();
        for wave in 0..REQUESTS / concurrent {
            let requests: Vec<_> = (0..concurrent)
                .map(|i| {
                    let loader = cache.loader();
                    let r = wave * concurrent + i;
                    tokio::spawn(async move {
                        let started = Instant::now();
                        let tasks: Vec<_> = (0..TASKS)
                            .map(|t| {
                                let loader = loader.clone();
                                // Fresh keys every request: every load is a miss.
                                let base = (r * TASKS + t) * KEYS;
                                tokio::spawn(
                                    async move { loader.load_many(base..base + KEYS).await },
                                )
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("task").expect("load");
                        }
                        started.elapsed()
                    })
                })
                .collect();
            for request in requests {
                latencies.push(request.await.expect("request"));
            }
        }
        latencies
    });
    latencies.sort();
    let mean = latencies.iter().sum::<Duration>() / latencies.len() as u32;
    let p99 = latencies[latencies.len() * 99 / 100];
    println!(
        "{:>8}us {:>11} {:>16.2} {:>10.3} {:>10.3}",
        window.as_micros(),
        concurrent,
        cache.stats().batches as f64 / latencies.len() as f64,
        mean.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
    );
}
