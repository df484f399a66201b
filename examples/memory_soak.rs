//! Soak: 2,000,000 distinct keys through a cache on
//! `MemoryStore::with_capacity(100_000)`, and the same through
//! `MemoryStore::unbounded()` for contrast, each in a process of its own so
//! that its peak resident memory (`VmHWM`, Linux) is its own.
//!
//! ```text
//! cargo run --release --example memory_soak
//! cargo run --release --example memory_soak -- 500000   # fewer keys
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::process::Command;
use std::time::Instant;

use futures::future::join_all;
use loadlock::{BatchFetch, Cache, MemoryStore};

/// An instant provider of 64-byte values.
struct Values;

#[async_trait::async_trait]
impl BatchFetch for Values {
    type Key = u64;
    type Value = String;
    type Error = Infallible;

    fn namespace(&self) -> &str {
        "soak/v1"
    }

    fn max_batch_size(&self) -> usize {
        1000
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, Infallible> {
        Ok(keys.iter().map(|&k| (k, format!("{k:064}"))).collect())
    }
}

const CAPACITY: u64 = 100_000;
const PER_REQUEST: u64 = 1000;
const CONCURRENT: u64 = 16;

fn main() {
    let mut args = std::env::args().skip(1);
    let first = args.next();
    if let Some(store) = first
        .as_deref()
        .filter(|a| *a == "bounded" || *a == "unbounded")
    {
        let keys = args
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(2_000_000);
        soak(store, keys);
        return;
    }
    let keys: u64 = first.and_then(|n| n.parse().ok()).unwrap_or(2_000_000);
    println!("{keys} distinct keys, {PER_REQUEST} per request, {CONCURRENT} requests at a time, 64-byte values\n");
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>14} {:>8}",
        "store", "fetched", "held", "in flight", "peak RSS MiB", "secs"
    );
    let me = std::env::current_exe().expect("this example's path");
    for store in ["bounded", "unbounded"] {
        let out = Command::new(&me)
            .arg(store)
            .arg(keys.to_string())
            .output()
            .expect("running a soak process");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn soak(kind: &str, keys: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (store, label) = match kind {
        "bounded" => (
            MemoryStore::with_capacity(CAPACITY),
            format!("with_capacity({CAPACITY})"),
        ),
        _ => (MemoryStore::unbounded(), "unbounded()".to_string()),
    };
    let started = Instant::now();
    let stats = runtime.block_on(async {
        let cache = Cache::builder(Values)
            .store(store.clone())
            .build()
            .expect("cache");
        let requests = keys.div_ceil(PER_REQUEST);
        for wave in (0..requests).step_by(CONCURRENT as usize) {
            let batch = (wave..(wave + CONCURRENT).min(requests)).map(|r| {
                let loader = cache.loader();
                tokio::spawn(async move {
                    let from = r * PER_REQUEST;
                    let to = (from + PER_REQUEST).min(keys);
                    loader.load_many(from..to).await.expect("load").len()
                })
            });
            for task in join_all(batch).await {
                task.expect("request");
            }
        }
        cache.stats()
    });
    println!(
        "{:<28} {:>10} {:>10} {:>10} {:>14.1} {:>8.1}",
        format!("MemoryStore::{label}"),
        stats.provider_keys,
        store.len(),
        stats.in_flight,
        peak_rss_mib(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        stats.in_flight, 0,
        "the in-flight table is empty afterwards"
    );
}

/// The process's peak resident set (`VmHWM`), in MiB; 0 where unknown.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
