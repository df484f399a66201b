//! The main job: a fleet serving requests through loadlock, against real
//! Postgres and a rate-limited provider, next to what the alternatives cost.
//!
//! I instances (each its own pool) x R concurrent clients per instance, each
//! client making requests of K keys drawn from Zipf(s) over N keys. The same
//! workload (same seeds, same keys) runs under five strategies:
//!
//! * `per-key` — every load calls the provider (the naive client);
//! * `dataloader` — per-request dedup and batching, no shared cache;
//! * `cache-aside` — a shared Postgres table without locks (read, miss,
//!   fetch, write);
//! * `loadlock` — fills under leases (the default protocol);
//! * `loadlock-held` — fills in held transactions (the older protocol).
//!
//! ```text
//! cargo run --release --example hit_ratio
//! cargo run --release --example hit_ratio -- --json
//! cargo run --release --example hit_ratio -- --plot hit_ratio.svg --sweep-instances 1,2,4,8
//! ```
//!
//! Postgres is found as the tests find it: `DATABASE_URL`, a local server on
//! 127.0.0.1:5432, or a throwaway cluster started from the installed server
//! binaries (it stops itself shortly after the run).

#[allow(dead_code, unreachable_pub)]
#[path = "../tests/support/pg.rs"]
mod pg;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use loadlock::{BatchFetch, Cache, ErrorClass, FillMode, PgStore, RetryPolicy, Stats};
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;
use sqlx::PgPool;

#[derive(Parser, Debug, Clone)]
#[command(about = "Hit ratio and provider calls of loadlock next to the alternatives")]
struct Args {
    /// Service instances, each a Cache on its own pool.
    #[arg(long, default_value_t = 8)]
    instances: usize,
    /// Concurrent clients (requests in flight) per instance.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keys loaded per request.
    #[arg(long, default_value_t = 20)]
    keys_per_request: usize,
    /// Size of the key space.
    #[arg(long, default_value_t = 5000)]
    key_space: u64,
    /// Zipf exponent of the key popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Requests per client (ignored with --duration).
    #[arg(long, default_value_t = 30)]
    requests: usize,
    /// Run each strategy for this many seconds instead of a request count;
    /// requests in flight at the end are completed and counted.
    #[arg(long)]
    duration: Option<f64>,
    /// Provider latency per call, in milliseconds.
    #[arg(long, default_value_t = 20)]
    latency_ms: u64,
    /// Provider rate limit, calls per second (it answers "429" beyond it).
    #[arg(long, default_value_t = 20_000)]
    rate_limit: u32,
    /// Provider's maximum keys per call.
    #[arg(long, default_value_t = 100)]
    max_batch: usize,
    /// Connections per instance pool.
    #[arg(long, default_value_t = 8)]
    pool_size: u32,
    /// Strategies to run.
    #[arg(long, value_delimiter = ',', default_values_t = ["per-key".to_string(), "dataloader".to_string(), "cache-aside".to_string(), "loadlock".to_string(), "loadlock-held".to_string()])]
    strategies: Vec<String>,
    /// Print one JSON object to stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw the results into this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Also run the shared-cache strategies at these instance counts and plot
    /// hit ratio against instances (for example 1,2,4,8).
    #[arg(long, value_delimiter = ',')]
    sweep_instances: Vec<usize>,
    /// Seed of the key draws.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

// ---------------------------------------------------------------- provider

/// The simulated provider: a latency per call and a rate limit enforced on
/// its side (a GCRA, burst of 1/10 s): a call beyond it is refused with a
/// retry-after, like an HTTP 429.
struct Sim {
    latency: Duration,
    max_batch: usize,
    emission: Duration,
    tolerance: Duration,
    tat: Mutex<Instant>,
    calls: AtomicU64,
    keys: AtomicU64,
    refused: AtomicU64,
}

#[derive(Debug)]
struct Throttled(Duration);

impl std::fmt::Display for Throttled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rate limited, retry after {:?}", self.0)
    }
}

impl std::error::Error for Throttled {}

impl Sim {
    fn new(args: &Args) -> Arc<Sim> {
        let emission = Duration::from_secs(1) / args.rate_limit.max(1);
        Arc::new(Sim {
            latency: Duration::from_millis(args.latency_ms),
            max_batch: args.max_batch,
            emission,
            tolerance: Duration::from_millis(100),
            tat: Mutex::new(Instant::now()),
            calls: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, Throttled> {
        {
            let now = Instant::now();
            let mut tat = self.tat.lock().unwrap();
            let base = (*tat).max(now);
            if base.duration_since(now) > self.tolerance {
                self.refused.fetch_add(1, Relaxed);
                return Err(Throttled(base.duration_since(now) - self.tolerance));
            }
            *tat = base + self.emission;
        }
        self.calls.fetch_add(1, Relaxed);
        self.keys.fetch_add(keys.len() as u64, Relaxed);
        tokio::time::sleep(self.latency).await;
        Ok(keys.iter().map(|&k| (k, value(k))).collect())
    }

    /// What the baselines do: wait out every refusal and ask again.
    async fn fetch_patiently(&self, keys: &[u64], waits: &AtomicU64) -> HashMap<u64, String> {
        let mut found = HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(self.max_batch) {
            loop {
                match self.fetch(chunk).await {
                    Ok(values) => {
                        found.extend(values);
                        break;
                    }
                    Err(Throttled(after)) => {
                        waits.fetch_add(1, Relaxed);
                        tokio::time::sleep(after).await;
                    }
                }
            }
        }
        found
    }
}

fn value(key: u64) -> String {
    format!("{{\"id\":{key},\"name\":\"user {key}\",\"plan\":\"pro\"}}")
}

/// The provider as loadlock sees it.
struct SimFetch {
    sim: Arc<Sim>,
    namespace: String,
}

#[async_trait::async_trait]
impl BatchFetch for SimFetch {
    type Key = u64;
    type Value = String;
    type Error = Throttled;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn max_batch_size(&self) -> usize {
        self.sim.max_batch
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, Throttled> {
        self.sim.fetch(keys).await
    }

    fn classify(&self, error: &Throttled) -> ErrorClass {
        ErrorClass::RateLimited {
            retry_after: Some(error.0),
        }
    }
}

// ---------------------------------------------------------------- strategies

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    PerKey,
    DataLoader,
    CacheAside,
    /// loadlock with this fill protocol.
    Loadlock(FillMode),
}

impl Kind {
    fn parse(name: &str) -> Option<Kind> {
        Some(match name {
            "per-key" => Kind::PerKey,
            "dataloader" => Kind::DataLoader,
            "cache-aside" => Kind::CacheAside,
            "loadlock" => Kind::Loadlock(FillMode::Lease),
            "loadlock-held" => Kind::Loadlock(FillMode::HeldTransaction),
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::PerKey => "per-key",
            Kind::DataLoader => "dataloader",
            Kind::CacheAside => "cache-aside",
            Kind::Loadlock(FillMode::HeldTransaction) => "loadlock-held",
            Kind::Loadlock(_) => "loadlock",
        }
    }
}

/// One instance's client under one strategy.
enum Client {
    PerKey(Arc<Sim>),
    DataLoader(Arc<Sim>),
    CacheAside {
        sim: Arc<Sim>,
        pool: PgPool,
        table: String,
        namespace: String,
    },
    Loadlock(Cache<SimFetch>),
}

/// What one request was answered by, per key.
#[derive(Default)]
struct Tally {
    memo: u64,
    store: u64,
}

impl Client {
    async fn request(&self, keys: &[u64], waits: &AtomicU64) -> Result<Tally, loadlock::Error> {
        match self {
            Client::PerKey(sim) => {
                join_all(
                    keys.iter()
                        .map(|k| sim.fetch_patiently(std::slice::from_ref(k), waits)),
                )
                .await;
                Ok(Tally::default())
            }
            Client::DataLoader(sim) => {
                let unique = dedup(keys);
                sim.fetch_patiently(&unique, waits).await;
                Ok(Tally {
                    memo: (keys.len() - unique.len()) as u64,
                    store: 0,
                })
            }
            Client::CacheAside {
                sim,
                pool,
                table,
                namespace,
            } => {
                let unique = dedup(keys);
                let texts: Vec<String> = unique.iter().map(u64::to_string).collect();
                // Reads and decodes the values, as loadlock does, one
                // primary-key probe per key as loadlock's read: the plain
                // `key = ANY($2)` is planned, on a table without statistics
                // yet (a new table, or autovacuum off), as a scan of the
                // whole namespace, which would handicap this baseline.
                let found: Vec<(String, sqlx::types::Json<String>)> = sqlx::query_as(&format!(
                    "SELECT c.key, c.value FROM unnest($2::text[]) AS k(key) \
                     CROSS JOIN LATERAL (SELECT key, value FROM {table} c \
                       WHERE c.namespace = $1 AND c.key = k.key AND c.expires_at > now() \
                       LIMIT 1) c"
                ))
                .bind(namespace)
                .bind(&texts)
                .fetch_all(pool)
                .await
                .map_err(|e| loadlock::Error::store("cache-aside read", e))?;
                let found: HashSet<String> = found.into_iter().map(|(key, _)| key).collect();
                let missing: Vec<u64> = unique
                    .iter()
                    .copied()
                    .filter(|k| !found.contains(&k.to_string()))
                    .collect();
                if !missing.is_empty() {
                    let fetched = sim.fetch_patiently(&missing, waits).await;
                    let mut rows: Vec<(String, String)> = fetched
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect();
                    rows.sort();
                    let (ks, vs): (Vec<String>, Vec<String>) = rows.into_iter().unzip();
                    sqlx::query(&format!(
                        "INSERT INTO {table} (namespace, key, value, fetched_at, expires_at) \
                         SELECT $1, k, to_jsonb(v), now(), now() + interval '1 hour' \
                         FROM unnest($2::text[], $3::text[]) AS u(k, v) ORDER BY k \
                         ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value, \
                           fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at"
                    ))
                    .bind(namespace)
                    .bind(&ks)
                    .bind(&vs)
                    .execute(pool)
                    .await
                    .map_err(|e| loadlock::Error::store("cache-aside write", e))?;
                }
                Ok(Tally {
                    memo: (keys.len() - unique.len()) as u64,
                    store: found.len() as u64,
                })
            }
            Client::Loadlock(cache) => {
                cache.loader().load_many(keys.iter().copied()).await?;
                Ok(Tally::default())
            }
        }
    }
}

fn dedup(keys: &[u64]) -> Vec<u64> {
    let mut seen = HashSet::with_capacity(keys.len());
    keys.iter().copied().filter(|k| seen.insert(*k)).collect()
}

// ---------------------------------------------------------------- running

#[derive(Debug, Clone, serde::Serialize)]
struct Report {
    name: &'static str,
    instances: usize,
    loads: u64,
    requests: u64,
    provider_calls: u64,
    provider_keys: u64,
    distinct_keys: u64,
    duplicate_ratio: f64,
    hit_ratio: f64,
    ideal_hit_ratio: f64,
    memo_share: f64,
    coalesced_share: f64,
    store_share: f64,
    provider_share: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    wall_s: f64,
    rate_limit_waits: u64,
}

struct Env {
    args: Args,
    url: String,
    table: String,
    run_id: String,
}

/// One new pool per instance and run, so no strategy runs on connections
/// (and server sessions) another strategy opened and warmed up; each opens
/// its own as a service that just started would.
async fn open_pools(url: &str, instances: usize, size: u32) -> Vec<PgPool> {
    let mut pools = Vec::new();
    for _ in 0..instances {
        pools.push(
            sqlx::postgres::PgPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(Duration::from_secs(60))
                .connect(url)
                .await
                .expect("pool"),
        );
    }
    pools
}

async fn run(env: &Env, kind: Kind, instances: usize, progress: &ProgressBar) -> Report {
    let args = &env.args;
    let sim = Sim::new(args);
    // A namespace of its own per run: no run starts with another's entries.
    static RUNS: AtomicU64 = AtomicU64::new(0);
    let namespace = format!(
        "bench/{}/{}/{}",
        kind.name(),
        env.run_id,
        RUNS.fetch_add(1, Relaxed)
    );
    let pools = open_pools(&env.url, instances, args.pool_size).await;
    let mut clients = Vec::new();
    for pool in &pools {
        clients.push(Arc::new(match kind {
            Kind::PerKey => Client::PerKey(sim.clone()),
            Kind::DataLoader => Client::DataLoader(sim.clone()),
            Kind::CacheAside => Client::CacheAside {
                sim: sim.clone(),
                pool: pool.clone(),
                table: env.table.clone(),
                namespace: namespace.clone(),
            },
            Kind::Loadlock(fill) => {
                let store = PgStore::builder(pool.clone())
                    .table(env.table.clone())
                    .fill_mode(fill)
                    .build()
                    .expect("store");
                Client::Loadlock(
                    Cache::builder(SimFetch {
                        sim: sim.clone(),
                        namespace: namespace.clone(),
                    })
                    .store(store)
                    .ttl(Duration::from_secs(3600))
                    // Rate-limited answers are waited out (to the policy's
                    // deadline) without spending attempts.
                    .retry(RetryPolicy::default().with_max_retry_after(Duration::from_secs(5)))
                    .provider_timeout(Duration::from_secs(5))
                    .build()
                    .expect("cache"),
                )
            }
        }));
    }

    let waits = Arc::new(AtomicU64::new(0));
    let memo = Arc::new(AtomicU64::new(0));
    let store = Arc::new(AtomicU64::new(0));
    let deadline = args
        .duration
        .map(|d| Instant::now() + Duration::from_secs_f64(d));
    let zipf = Zipf::new(args.key_space, args.zipf).expect("zipf parameters");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, client) in clients.iter().enumerate() {
        for c in 0..args.concurrency {
            let (client, waits, memo, store, progress) = (
                client.clone(),
                waits.clone(),
                memo.clone(),
                store.clone(),
                progress.clone(),
            );
            let seed = args.seed ^ ((i as u64) << 32) ^ c as u64;
            let (k, requests) = (args.keys_per_request, args.requests);
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut asked = Vec::new();
                let mut latencies = Vec::new();
                let mut done = 0;
                loop {
                    let more = match deadline {
                        Some(deadline) => Instant::now() < deadline,
                        None => done < requests,
                    };
                    if !more {
                        break;
                    }
                    let keys: Vec<u64> = (0..k).map(|_| rng.sample(zipf) as u64).collect();
                    let t = Instant::now();
                    match client.request(&keys, &waits).await {
                        Ok(tally) => {
                            memo.fetch_add(tally.memo, Relaxed);
                            store.fetch_add(tally.store, Relaxed);
                            latencies.push(t.elapsed());
                            asked.extend_from_slice(&keys);
                        }
                        Err(err) => {
                            // A broken setup (database down, too few
                            // connections) would only repeat: stop here.
                            let mut message = format!("request failed: {err}");
                            let mut source = std::error::Error::source(&err);
                            while let Some(cause) = source {
                                message.push_str(&format!(": {cause}"));
                                source = cause.source();
                            }
                            eprintln!("{message}");
                            std::process::exit(1);
                        }
                    }
                    done += 1;
                    progress.inc(1);
                }
                (asked, latencies)
            }));
        }
    }
    let mut asked_all = Vec::new();
    let mut latencies = Vec::new();
    for task in join_all(tasks).await {
        let (asked, lat) = task.expect("client task");
        asked_all.extend(asked);
        latencies.extend(lat);
    }
    let wall = started.elapsed();

    let loads = asked_all.len() as u64;
    let distinct = asked_all.iter().collect::<HashSet<_>>().len() as u64;
    let provider_keys = sim.keys.load(Relaxed);
    let provider_calls = sim.calls.load(Relaxed);
    let share = |n: u64| {
        if loads == 0 {
            0.0
        } else {
            n as f64 / loads as f64
        }
    };
    let (memo_hits, coalesced, store_hits, waits) = match &*clients[0] {
        Client::Loadlock(_) => {
            let total = clients.iter().fold(Stats::default(), |mut sum, c| {
                if let Client::Loadlock(cache) = &**c {
                    let s = cache.stats();
                    sum.memo_hits += s.memo_hits;
                    sum.coalesced += s.coalesced;
                    sum.store_hits += s.store_hits;
                    sum.rate_limited_waits += s.rate_limited_waits;
                }
                sum
            });
            (
                total.memo_hits,
                total.coalesced,
                total.store_hits,
                total.rate_limited_waits,
            )
        }
        _ => (
            memo.load(Relaxed),
            0,
            store.load(Relaxed),
            waits.load(Relaxed),
        ),
    };
    drop(clients);
    for pool in &pools {
        pool.close().await;
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    Report {
        name: kind.name(),
        instances,
        loads,
        requests: latencies.len() as u64,
        provider_calls,
        provider_keys,
        distinct_keys: distinct,
        duplicate_ratio: if distinct == 0 {
            0.0
        } else {
            provider_keys as f64 / distinct as f64
        },
        hit_ratio: 1.0 - share(provider_keys),
        ideal_hit_ratio: 1.0 - share(distinct),
        memo_share: share(memo_hits),
        coalesced_share: share(coalesced),
        store_share: share(store_hits),
        provider_share: share(provider_keys),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        wall_s: wall.as_secs_f64(),
        rate_limit_waits: waits,
    }
}

fn print_table(reports: &[Report]) {
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "strategy", "loads", "calls", "p.keys", "distinct", "dup", "hit", "ideal", "memo", "coal", "store",
        "p50 ms", "p99 ms", "max ms", "wall s", "429s"
    );
    for r in reports {
        println!(
            "{:<12} {:>8} {:>8} {:>8} {:>8} {:>7.3} {:>7.3} {:>7.3} {:>5.1}% {:>5.1}% {:>5.1}% {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7}",
            r.name,
            r.loads,
            r.provider_calls,
            r.provider_keys,
            r.distinct_keys,
            r.duplicate_ratio,
            r.hit_ratio,
            r.ideal_hit_ratio,
            r.memo_share * 100.0,
            r.coalesced_share * 100.0,
            r.store_share * 100.0,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.wall_s,
            r.rate_limit_waits,
        );
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let kinds: Vec<Kind> = args
        .strategies
        .iter()
        .map(|name| {
            Kind::parse(name).unwrap_or_else(|| {
                eprintln!(
                    "unknown strategy {name:?}: use per-key, dataloader, cache-aside, loadlock, \
                     loadlock-held"
                );
                std::process::exit(2)
            })
        })
        .collect();
    if args.instances == 0
        || args.concurrency == 0
        || args.keys_per_request == 0
        || args.key_space == 0
    {
        eprintln!(
            "--instances, --concurrency, --keys-per-request and --key-space must be positive"
        );
        std::process::exit(2);
    }

    let db = pg::TestDb::new("hit_ratio").await;
    let max_instances = args
        .sweep_instances
        .iter()
        .copied()
        .chain([args.instances])
        .max()
        .unwrap_or(1);
    let max_connections: String = sqlx::query_scalar("SHOW max_connections")
        .fetch_one(&db.pool(1).await)
        .await
        .expect("reading max_connections");
    // Each loadlock instance also keeps one listener connection.
    let needed = max_instances as u64 * (u64::from(args.pool_size) + 1) + 5;
    if needed > max_connections.parse::<u64>().unwrap_or(u64::MAX) {
        eprintln!(
            "{max_instances} instances x {} connections need {needed} connections; \
             the server allows {max_connections}: lower --pool-size",
            args.pool_size
        );
        std::process::exit(2);
    }
    let admin = db.pool(1).await;
    PgStore::builder(admin.clone())
        .table(db.table())
        .unlogged(true)
        .build()
        .expect("store")
        .migrate()
        .await
        .expect("migrate");
    admin.close().await;
    let env = Env {
        args: args.clone(),
        url: db.url.clone(),
        table: db.table(),
        run_id: std::process::id().to_string(),
    };

    let per_run = |instances: usize| match args.duration {
        None => (instances * args.concurrency * args.requests) as u64,
        Some(_) => 0,
    };
    let bar = |len: u64, label: String| {
        let pb = if len > 0 {
            ProgressBar::new(len)
        } else {
            ProgressBar::new_spinner()
        };
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} requests",
            )
            .expect("template"),
        );
        pb.set_prefix(label);
        pb
    };

    let mut reports = Vec::new();
    for &kind in &kinds {
        let pb = bar(per_run(args.instances), kind.name().to_string());
        reports.push(run(&env, kind, args.instances, &pb).await);
        pb.finish_and_clear();
    }
    let mut sweep = Vec::new();
    for &n in &args.sweep_instances {
        for kind in [
            Kind::DataLoader,
            Kind::CacheAside,
            Kind::Loadlock(FillMode::Lease),
        ] {
            if !kinds.contains(&kind) || n == 0 {
                continue;
            }
            let pb = bar(per_run(n), format!("{} x{n}", kind.name()));
            sweep.push(run(&env, kind, n, &pb).await);
            pb.finish_and_clear();
        }
    }

    if args.json {
        let out = serde_json::json!({
            "workload": {
                "instances": args.instances,
                "concurrency": args.concurrency,
                "keys_per_request": args.keys_per_request,
                "key_space": args.key_space,
                "zipf": args.zipf,
                "requests_per_client": args.requests,
                "duration_s": args.duration,
                "latency_ms": args.latency_ms,
                "rate_limit": args.rate_limit,
                "max_batch": args.max_batch,
            },
            "strategies": reports,
            "sweep": sweep,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!(
            "{} instances x {} concurrent requests x {} keys, Zipf({}) over {} keys, {}; provider {} ms, {} calls/s, max batch {}\n",
            args.instances,
            args.concurrency,
            args.keys_per_request,
            args.zipf,
            args.key_space,
            match args.duration {
                Some(d) => format!("{d} s per strategy"),
                None => format!("{} requests per client", args.requests),
            },
            args.latency_ms,
            args.rate_limit,
            args.max_batch
        );
        print_table(&reports);
        if !sweep.is_empty() {
            println!("\nhit ratio by instance count:");
            print_table(&sweep);
        }
    }
    if let Some(path) = &args.plot {
        plot::draw(path, &reports, &sweep).expect("plot");
        eprintln!("plot written to {}", path.display());
    }
    db.cleanup().await;
}

mod plot {
    use plotters::prelude::*;

    use super::Report;

    const COLORS: [RGBColor; 4] = [
        RGBColor(0x99, 0x99, 0x99),
        RGBColor(0xe6, 0x9f, 0x00),
        RGBColor(0xd5, 0x5e, 0x00),
        RGBColor(0x00, 0x72, 0xb2),
    ];

    fn color(name: &str) -> RGBColor {
        match name {
            "per-key" => COLORS[0],
            "dataloader" => COLORS[1],
            "cache-aside" => COLORS[2],
            _ => COLORS[3],
        }
    }

    pub(super) fn draw(
        path: &std::path::Path,
        reports: &[Report],
        sweep: &[Report],
    ) -> Result<(), Box<dyn std::error::Error>> {
        let panels = if sweep.is_empty() { 2 } else { 3 };
        let root = SVGBackend::new(path, (420 * panels, 380)).into_drawing_area();
        root.fill(&WHITE)?;
        let areas = root.split_evenly((1, panels as usize));

        // Hit ratio per strategy, with the ideal as a line.
        let n = reports.len();
        let mut chart = ChartBuilder::on(&areas[0])
            .caption("hit ratio (line: ideal)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d(0f64..n as f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("share of loads without the provider")
            .draw()?;
        for (i, r) in reports.iter().enumerate() {
            let x = i as f64;
            chart.draw_series([Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, r.hit_ratio)],
                color(r.name).filled(),
            )])?;
            chart.draw_series([PathElement::new(
                [(x + 0.1, r.ideal_hit_ratio), (x + 0.9, r.ideal_hit_ratio)],
                BLACK.stroke_width(2),
            )])?;
            chart.draw_series([Text::new(
                r.name.to_string(),
                (x + 0.18, 0.06),
                ("sans-serif", 12).into_font().color(&BLACK),
            )])?;
            let (y, fg) = if r.hit_ratio > 0.85 {
                (r.hit_ratio - 0.04, WHITE)
            } else {
                (r.hit_ratio + 0.06, BLACK)
            };
            chart.draw_series([Text::new(
                format!("{:.3}", r.hit_ratio),
                (x + 0.3, y),
                ("sans-serif", 12).into_font().color(&fg),
            )])?;
        }

        // Provider calls per strategy (log scale).
        let max_calls = reports
            .iter()
            .map(|r| r.provider_calls)
            .max()
            .unwrap_or(1)
            .max(1) as f64;
        let mut chart = ChartBuilder::on(&areas[1])
            .caption("provider calls (log scale)", ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..n as f64, (1f64..max_calls * 3.0).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()?;
        for (i, r) in reports.iter().enumerate() {
            let x = i as f64;
            let calls = (r.provider_calls as f64).max(1.0);
            chart.draw_series([Rectangle::new(
                [(x + 0.15, 1.0), (x + 0.85, calls)],
                color(r.name).filled(),
            )])?;
            chart.draw_series([Text::new(
                r.provider_calls.to_string(),
                (x + 0.2, calls * 1.4),
                ("sans-serif", 12),
            )])?;
            chart.draw_series([Text::new(
                r.name.to_string(),
                (x + 0.18, 1.6),
                ("sans-serif", 12),
            )])?;
        }

        if !sweep.is_empty() {
            let max_n = sweep.iter().map(|r| r.instances).max().unwrap_or(1) as f64;
            let mut chart = ChartBuilder::on(&areas[2])
                .caption("hit ratio by instances", ("sans-serif", 18))
                .margin(12)
                .x_label_area_size(30)
                .y_label_area_size(40)
                .build_cartesian_2d(0.5f64..max_n + 0.5, 0f64..1f64)?;
            chart
                .configure_mesh()
                .x_desc("instances")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .draw()?;
            for name in ["dataloader", "cache-aside", "loadlock"] {
                let points: Vec<(f64, f64)> = sweep
                    .iter()
                    .filter(|r| r.name == name)
                    .map(|r| (r.instances as f64, r.hit_ratio))
                    .collect();
                if points.is_empty() {
                    continue;
                }
                let c = color(name);
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))?
                    .label(name)
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], c.stroke_width(2))
                    });
                chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()?;
        }
        root.present()?;
        Ok(())
    }
}
