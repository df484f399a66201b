//! A small simulated workload through one `Cache`: concurrent requests, each
//! with its own `Loader`, reading users from a slow provider. Prints what
//! each tier answered.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, Cache};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
}

/// The "external API": 25 ms per call, ids above 900 do not exist.
struct UserApi {
    calls: AtomicU64,
    /// Every id ever fetched, to show that none was fetched twice.
    fetched: Mutex<Vec<u64>>,
}

#[derive(Debug, thiserror::Error)]
#[error("user API unavailable")]
struct ApiError;

#[async_trait::async_trait]
impl BatchFetch for UserApi {
    type Key = u64;
    type Value = User;
    type Error = ApiError;

    fn namespace(&self) -> &str {
        "users/v1"
    }

    fn max_batch_size(&self) -> usize {
        50
    }

    async fn fetch(&self, ids: &[u64]) -> Result<HashMap<u64, User>, ApiError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.fetched.lock().unwrap().extend_from_slice(ids);
        tokio::time::sleep(Duration::from_millis(25)).await;
        Ok(ids
            .iter()
            .filter(|&&id| id <= 900)
            .map(|&id| {
                let name = format!("user #{id}");
                (id, User { id, name })
            })
            .collect())
    }
}

/// A request handler: one loader per request; the "page" shows a user, their
/// 10 friends, and the friends' best friends (many repeats).
async fn handle_request(cache: &Cache<Arc<UserApi>>, seed: u64) -> Result<usize, loadlock::Error> {
    let loader = cache.loader();
    let me = seed % 40;
    let friends: Vec<u64> = (1..=10).map(|i| (me * 7 + i * i) % 120).collect();
    let (profile, friends) = tokio::join!(loader.load(me), loader.load_many(friends.clone()));
    let best: Vec<u64> = friends?.keys().map(|id| (id * 3) % 120).collect();
    let best = loader.load_many(best).await?;
    let ghost = loader.load(950 + seed % 5).await?; // not found: a negative entry
    Ok(usize::from(profile?.is_some()) + best.len() + usize::from(ghost.is_some()))
}

#[tokio::main]
async fn main() -> Result<(), loadlock::Error> {
    let api = Arc::new(UserApi {
        calls: AtomicU64::new(0),
        fetched: Mutex::new(Vec::new()),
    });
    let cache = Cache::builder(api.clone())
        .ttl(Duration::from_secs(300))
        .build()?;

    let started = Instant::now();
    // 3 waves of 100 concurrent requests.
    for wave in 0..3u64 {
        let requests = (0..100).map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { handle_request(&cache, wave * 1000 + i).await })
        });
        for result in futures::future::join_all(requests).await {
            result.expect("request task")?;
        }
    }
    let elapsed = started.elapsed();

    let s = cache.stats();
    println!("300 requests in {:.0} ms", elapsed.as_secs_f64() * 1e3);
    println!();
    println!("{:<34} {:>8}", "tier", "loads");
    println!("{:<34} {:>8}", "total loads", s.loads);
    println!(
        "{:<34} {:>8}",
        "tier 0  memo hits (same request)", s.memo_hits
    );
    println!("{:<34} {:>8}", "tier 1  coalesced (in flight)", s.coalesced);
    println!("{:<34} {:>8}", "tier 2  store hits", s.store_hits);
    println!("{:<34} {:>8}", "        of which negative", s.negative_hits);
    println!("{:<34} {:>8}", "tier 3  provider keys", s.provider_keys);
    println!();
    println!(
        "provider calls: {} (the API counted {})",
        s.provider_calls,
        api.calls.load(Ordering::Relaxed)
    );
    let fetched = api.fetched.lock().unwrap();
    let distinct: HashSet<&u64> = fetched.iter().collect();
    println!(
        "keys fetched:   {} for {} distinct keys ({} fetched twice)",
        fetched.len(),
        distinct.len(),
        fetched.len() - distinct.len()
    );
    println!("batches:        {}", s.batches);
    println!("hit ratio:      {:.3}", s.hit_ratio());
    println!("errors:         {}", s.errors);
    Ok(())
}
