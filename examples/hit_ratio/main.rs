//! The main job: a fleet serving requests through loadlock, against real
//! Postgres and a rate-limited provider, next to what the alternatives cost.
//!
//! I instances (each its own pool) x R concurrent clients per instance, each
//! client making requests of K keys drawn from Zipf(s) over N keys. The same
//! workload (same seeds, same keys) runs under each strategy:
//!
//! * `per-key` — every load calls the provider (the naive client);
//! * `dataloader` — per-request dedup and batching, no shared cache;
//! * `cache-aside` — a shared Postgres table without locks (read, miss,
//!   fetch, write);
//! * `loadlock` — fills under leases (the default protocol);
//! * `loadlock-held` — fills in held transactions (the older protocol).
//!
//! By default the provider allows 100 calls/s for the whole fleet, a limit
//! that binds: the baselines wait out its 429s, and loadlock is configured
//! as the README tells users to, with `fleet_rate_limit` (a `PgRateLimit`
//! at 95% of the limit). `--open` runs the scenario where the limit is out
//! of reach (20,000 calls/s), with more load, every strategy, and no fleet
//! budget.
//!
//! Calls reach the provider over a simulated network (`--network-ms`, a
//! delay of 0–1 ms by default, drawn for each call and each retry). The
//! provider admits calls in the order they arrive; without the network,
//! retries that wake in the same millisecond arrive in the order the
//! runtime runs them, which mostly let the request refused last through
//! first and gave the baselines' later requests a turn at once (see the
//! README's Benchmarks).
//!
//! Next to the table of hit ratio, calls and latency percentiles, it
//! prints each strategy's median latency of every client's 1st, 2nd, ...
//! request and the mean of all: under a limit that binds, the median
//! alone does not show how the waits were shared out among the clients.
//!
//! ```text
//! cargo run --release --example hit_ratio
//! cargo run --release --example hit_ratio -- --open
//! cargo run --release --example hit_ratio -- --json
//! cargo run --release --example hit_ratio -- --open --strategies cache-aside,loadlock --rounds 8
//! cargo run --release --example hit_ratio -- --plot hit_ratio.svg --sweep-instances 1,2,4,8
//! cargo run --release --example hit_ratio -- --trace docs/sample_trace.csv --speed 10 --sweep-ttl 5,30,120
//! ```
//!
//! `--trace FILE` replays an access log instead of drawing keys; its format
//! is described in `trace.rs` and the README.
//!
//! Postgres is found as the tests find it: `DATABASE_URL`, a local server on
//! 127.0.0.1:5432, or a throwaway cluster started from the installed server
//! binaries (it stops itself shortly after the run).

mod delay;
#[allow(dead_code, unreachable_pub)]
#[path = "../../tests/support/pg.rs"]
mod pg;
mod plot;
mod rounds;
mod trace;

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use loadlock::store::ShardedStore;
use loadlock::{
    BatchFetch, Cache, ErrorClass, FillMode, PgRateLimit, PgStore, Quota, RetryPolicy, Stats,
};
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;
use sqlx::PgPool;

#[derive(Parser, Debug, Clone)]
#[command(about = "Hit ratio and provider calls of loadlock next to the alternatives")]
struct Cli {
    /// Service instances, each a Cache on its own pool.
    #[arg(long, default_value_t = 8)]
    instances: usize,
    /// Concurrent clients (requests in flight) per instance [default: 32;
    /// with --open, 64].
    #[arg(long)]
    concurrency: Option<usize>,
    /// Keys loaded per request.
    #[arg(long, default_value_t = 20)]
    keys_per_request: usize,
    /// Size of the key space.
    #[arg(long, default_value_t = 5000)]
    key_space: u64,
    /// Zipf exponent of the key popularity.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Requests per client (ignored with --duration) [default: 5; with
    /// --open, 30].
    #[arg(long)]
    requests: Option<usize>,
    /// Run each strategy for this many seconds instead of a request count;
    /// requests in flight at the end are completed and counted.
    #[arg(long)]
    duration: Option<f64>,
    /// Provider latency per call, in milliseconds [default: 50; with --open,
    /// 20].
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Vary each call's latency by up to this fraction either way, drawn
    /// uniformly (0.1: 45–55 ms for a latency of 50 ms; 0: every call
    /// takes the same).
    #[arg(long, default_value_t = 0.0)]
    jitter: f64,
    /// The network between the service and the provider: each call (and
    /// each retry) reaches the provider after a delay drawn uniformly from
    /// 0 up to this many milliseconds, so calls made in the same instant
    /// arrive in no fixed order. 0: every call arrives the instant it is
    /// made, and retries that wake in the same millisecond are admitted
    /// in the order the runtime runs them (mostly the request refused
    /// last first, as measured; see the README).
    #[arg(long, default_value_t = 1.0)]
    network_ms: f64,
    /// Provider rate limit, calls per second, for the whole fleet (it
    /// answers "429" beyond it) [default: 100; with --open, 20000].
    #[arg(long)]
    rate_limit: Option<u32>,
    /// The scenario where the provider's limit does not bind: 20,000
    /// calls/s, 20 ms, 64 clients per instance, 30 requests each, every
    /// strategy, and loadlock without a fleet budget. Flags given
    /// explicitly still apply.
    #[arg(long)]
    open: bool,
    /// Run loadlock without `fleet_rate_limit` (it is configured by default
    /// unless --open: a `PgRateLimit` at 95% of --rate-limit).
    #[arg(long)]
    no_fleet_limit: bool,
    /// Provider's maximum keys per call.
    #[arg(long, default_value_t = 100)]
    max_batch: usize,
    /// Connections per instance pool.
    #[arg(long, default_value_t = 8)]
    pool_size: u32,
    /// Statements loadlock's store runs at a time per instance
    /// (`PgStoreBuilder::lanes`; the default is the store's).
    #[arg(long, default_value_t = loadlock::store::postgres::DEFAULT_LANES)]
    lanes: std::num::NonZeroUsize,
    /// Strategies to run [default: dataloader, cache-aside, loadlock,
    /// loadlock-held; with --open, per-key too (under a binding limit it
    /// would take minutes)].
    #[arg(long, value_delimiter = ',')]
    strategies: Vec<String>,
    /// Run every strategy this many times, alternating the order (the
    /// given one, then reversed), and also report each strategy's medians
    /// over the rounds (p50, p99, wall time, calls, 429s; the worst
    /// round's duplicate-fetch ratio) with the latency medians' ratios to
    /// cache-aside's. The main table, the JSON's `strategies` and the plot
    /// show the last round; sweeps run once.
    #[arg(long, default_value_t = NonZeroUsize::MIN)]
    rounds: NonZeroUsize,
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
    /// Replay this access log instead of drawing keys (CSV lines
    /// `time,key[,request]`; see docs/sample_trace.csv): its requests at its
    /// times, spread over the instances in turn.
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Replay the trace this many times faster than it was logged (TTLs
    /// shrink with it).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Time to live of cached entries, in seconds of the workload's time (a
    /// trace's time before speeding it up).
    #[arg(long, default_value_t = 3600.0)]
    ttl: f64,
    /// Also run loadlock with each of these TTLs (seconds, for example
    /// 10,60,300) and report hit ratio and provider calls per TTL.
    #[arg(long, value_delimiter = ',')]
    sweep_ttl: Vec<f64>,
    /// Spread loadlock's store over this many Postgres servers (a
    /// `ShardedStore`): the first is the one the run found or started, the
    /// others throwaway clusters started for the run (or --shard-urls).
    #[arg(long, default_value_t = 1)]
    shards: usize,
    /// The servers of the shards after the first, as Postgres URLs, instead
    /// of throwaway clusters.
    #[arg(long, value_delimiter = ',')]
    shard_urls: Vec<String>,
}

/// The workload with the scenario's defaults filled in.
#[derive(Debug, Clone)]
struct Args {
    instances: usize,
    concurrency: usize,
    keys_per_request: usize,
    key_space: u64,
    zipf: f64,
    requests: usize,
    duration: Option<f64>,
    latency_ms: u64,
    jitter: f64,
    network: Duration,
    rate_limit: u32,
    /// Whether loadlock gets a fleet budget (`fleet_rate_limit`).
    fleet_limit: bool,
    max_batch: usize,
    pool_size: u32,
    lanes: std::num::NonZeroUsize,
    strategies: Vec<String>,
    rounds: NonZeroUsize,
    json: bool,
    plot: Option<PathBuf>,
    sweep_instances: Vec<usize>,
    seed: u64,
    trace: Option<Arc<trace::Trace>>,
    /// Where the trace came from, for the report.
    trace_path: Option<PathBuf>,
    speed: f64,
    ttl: f64,
    sweep_ttl: Vec<f64>,
    shards: usize,
    shard_urls: Vec<String>,
}

impl Cli {
    fn resolve(self) -> Args {
        let bad = |message: String| -> ! {
            eprintln!("{message}");
            std::process::exit(2)
        };
        let trace = self.trace.as_ref().map(|path| {
            let text = std::fs::read_to_string(path)
                .unwrap_or_else(|e| bad(format!("cannot read {}: {e}", path.display())));
            Arc::new(
                trace::parse(&text).unwrap_or_else(|e| bad(format!("{}: {e}", path.display()))),
            )
        });
        if self.shards == 0 {
            bad("--shards must be at least 1".into());
        }
        if !(self.network_ms.is_finite() && (0.0..=1000.0).contains(&self.network_ms)) {
            bad("--network-ms must be a number of milliseconds from 0 to 1000".into());
        }
        if !(0.0..1.0).contains(&self.jitter) {
            bad("--jitter must be a fraction from 0 up to (not including) 1".into());
        }
        if !self.shard_urls.is_empty() && self.shard_urls.len() + 1 != self.shards {
            bad(format!(
                "--shards {} needs {} --shard-urls (the first shard is the run's own server)",
                self.shards,
                self.shards.saturating_sub(1)
            ));
        }
        if !(self.speed.is_finite() && self.speed > 0.0) {
            bad("--speed must be a positive number".into());
        }
        for ttl in std::iter::once(&self.ttl).chain(&self.sweep_ttl) {
            if !(ttl.is_finite() && *ttl > 0.0) {
                bad(format!(
                    "a TTL must be a positive number of seconds, not {ttl}"
                ));
            }
        }
        let open = self.open;
        let pick = |binding: u64, open_value: u64| if open { open_value } else { binding };
        let strategies = if self.strategies.is_empty() {
            let mut names = vec!["dataloader", "cache-aside", "loadlock", "loadlock-held"];
            if open {
                names.insert(0, "per-key");
            }
            names.into_iter().map(str::to_owned).collect()
        } else {
            self.strategies
        };
        Args {
            instances: self.instances,
            concurrency: self.concurrency.unwrap_or(pick(32, 64) as usize),
            keys_per_request: self.keys_per_request,
            key_space: self.key_space,
            zipf: self.zipf,
            requests: self.requests.unwrap_or(pick(5, 30) as usize),
            duration: self.duration,
            latency_ms: self.latency_ms.unwrap_or(pick(50, 20)),
            jitter: self.jitter,
            network: Duration::from_secs_f64(self.network_ms / 1000.0),
            rate_limit: self.rate_limit.unwrap_or(pick(100, 20_000) as u32),
            fleet_limit: !open && !self.no_fleet_limit,
            max_batch: self.max_batch,
            pool_size: self.pool_size,
            lanes: self.lanes,
            strategies,
            rounds: self.rounds,
            json: self.json,
            plot: self.plot,
            sweep_instances: self.sweep_instances,
            seed: self.seed,
            trace,
            trace_path: self.trace,
            speed: self.speed,
            ttl: self.ttl,
            sweep_ttl: self.sweep_ttl,
            shards: self.shards,
            shard_urls: self.shard_urls,
        }
    }
}

// ---------------------------------------------------------------- provider

/// The simulated provider: a latency per call (kept to tens of
/// microseconds, see `delay`; varied by `--jitter`), a network before it
/// (`--network-ms`) and a rate limit enforced on its side (a GCRA, burst
/// of 1/10 s): a call beyond it is refused with a retry-after, like an
/// HTTP 429.
struct Sim {
    latency: Duration,
    /// The most a call's latency varies either way, as a fraction of it.
    jitter: f64,
    /// The most a call takes to reach the provider.
    network: Duration,
    max_batch: usize,
    emission: Duration,
    tolerance: Duration,
    tat: Mutex<Instant>,
    calls: AtomicU64,
    keys: AtomicU64,
    refused: AtomicU64,
    /// When the run started, and when each call came (seconds since), and
    /// whether it was refused.
    started: Mutex<Instant>,
    log: Mutex<Vec<(f64, bool)>>,
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
            jitter: args.jitter,
            network: args.network,
            max_batch: args.max_batch,
            emission,
            tolerance: Duration::from_millis(100),
            tat: Mutex::new(Instant::now()),
            calls: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            started: Mutex::new(Instant::now()),
            log: Mutex::new(Vec::new()),
        })
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, Throttled> {
        // The way to the provider: the limit below admits calls in the
        // order they arrive, and a network does not keep the order in which
        // calls were made to the microsecond.
        if !self.network.is_zero() {
            let transit = self.network.mul_f64(rand::thread_rng().gen::<f64>());
            delay::sleep(transit).await;
        }
        {
            let now = Instant::now();
            let mut tat = self.tat.lock().unwrap();
            let base = (*tat).max(now);
            let since = now
                .duration_since(*self.started.lock().unwrap())
                .as_secs_f64();
            let refused = base.duration_since(now) > self.tolerance;
            self.log.lock().unwrap().push((since, refused));
            if refused {
                self.refused.fetch_add(1, Relaxed);
                return Err(Throttled(base.duration_since(now) - self.tolerance));
            }
            *tat = base + self.emission;
        }
        self.calls.fetch_add(1, Relaxed);
        self.keys.fetch_add(keys.len() as u64, Relaxed);
        let latency = if self.jitter > 0.0 {
            self.latency
                .mul_f64(1.0 + rand::thread_rng().gen_range(-self.jitter..=self.jitter))
        } else {
            self.latency
        };
        delay::sleep(latency).await;
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

    /// As the README tells users: with a fleet budget, calls waiting for
    /// their turn carry the keys other instances miss meanwhile.
    fn parse_key(&self, text: &str) -> Option<u64> {
        text.parse().ok()
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
        ttl: Duration,
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
                ttl,
            } => {
                let unique = dedup(keys);
                let texts: Vec<String> = unique.iter().map(u64::to_string).collect();
                // Reads and decodes the values, as loadlock does, one
                // primary-key probe per key as loadlock's read: the plain
                // `key = ANY($2)` is planned, on a table without statistics
                // yet (a new table, or autovacuum off), as a scan of the
                // whole namespace, which would handicap this baseline.
                let found: Vec<(String, sqlx::types::Json<String>)> =
                    sqlx::query_as(sqlx::AssertSqlSafe(format!(
                        "SELECT c.key, c.value FROM unnest($2::text[]) AS k(key) \
                     CROSS JOIN LATERAL (SELECT key, value FROM {table} c \
                       WHERE c.namespace = $1 AND c.key = k.key AND c.expires_at > now() \
                       LIMIT 1) c"
                    )))
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
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "INSERT INTO {table} (namespace, key, value, fetched_at, expires_at) \
                         SELECT $1, k, to_jsonb(v), now(), now() + make_interval(secs => $4) \
                         FROM unnest($2::text[], $3::text[]) AS u(k, v) ORDER BY k \
                         ON CONFLICT (namespace, key) DO UPDATE SET value = EXCLUDED.value, \
                           fetched_at = EXCLUDED.fetched_at, expires_at = EXCLUDED.expires_at"
                    )))
                    .bind(namespace)
                    .bind(&ks)
                    .bind(&vs)
                    .bind(ttl.as_secs_f64())
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

/// A broken setup (database down, too few connections) would only repeat:
/// stop at the first failed request.
fn fail(err: &loadlock::Error) -> ! {
    let mut message = format!("request failed: {err}");
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    std::process::exit(1);
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
    /// The mean latency of a request. With every client making its requests
    /// one after the other, it is about the clients' time from the start to
    /// their last answer, over the requests they made, however the waits
    /// were shared out among the requests.
    mean_ms: f64,
    /// The median latency of each client's first request, of its second,
    /// and so on; the `TURNS`th is of every request from the `TURNS`th on
    /// (empty for a trace's replay).
    p50_by_turn_ms: Vec<f64>,
    max_ms: f64,
    wall_s: f64,
    /// Calls the provider refused (its "429"s).
    refused: u64,
    /// Refused calls among all calls tried.
    refused_share: f64,
    /// Calls that waited for a budget: the client's own (loadlock's rate
    /// limiter) or a 429's retry-after (the baselines).
    rate_limit_waits: u64,
    /// Time to live, in seconds of the workload's time.
    ttl_s: f64,
    /// Calls made and refused in each second of the run.
    calls_per_second: Vec<(u64, u64)>,
    /// Requests answered per second of the run.
    throughput: f64,
    /// Distinct keys per shard of loadlock's store (empty for the others).
    shard_keys: Vec<u64>,
}

struct Env {
    args: Args,
    url: String,
    table: String,
    /// The fleet budget's table, when loadlock gets one.
    budget_table: Option<String>,
    /// The shards after the first (URL and table), when loadlock's store is
    /// sharded.
    more_shards: Vec<(String, String)>,
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

async fn run(
    env: &Env,
    kind: Kind,
    instances: usize,
    ttl_s: f64,
    progress: &ProgressBar,
) -> Report {
    let args = &env.args;
    let ttl = Duration::from_secs_f64(ttl_s / args.speed);
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
    let mut extra_pools = Vec::new();
    let mut routers: Vec<ShardedStore<PgStore>> = Vec::new();
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
                ttl,
            },
            Kind::Loadlock(fill) => {
                let store = PgStore::builder(pool.clone())
                    .table(env.table.clone())
                    .fill_mode(fill)
                    .lanes(args.lanes)
                    .build()
                    .expect("store");
                let mut shards = vec![("shard-0".to_string(), store)];
                for (i, (url, table)) in env.more_shards.iter().enumerate() {
                    let pool = open_pools(url, 1, args.pool_size).await.remove(0);
                    extra_pools.push(pool.clone());
                    let store = PgStore::builder(pool)
                        .table(table.clone())
                        .fill_mode(fill)
                        .lanes(args.lanes)
                        .build()
                        .expect("store");
                    shards.push((format!("shard-{}", i + 1), store));
                }
                let store = ShardedStore::new(shards).expect("shards");
                routers.push(store.clone());
                let mut builder = Cache::builder(SimFetch {
                    sim: sim.clone(),
                    namespace: namespace.clone(),
                });
                if let Some(table) = &env.budget_table {
                    // As the README tells users: one budget for the fleet,
                    // at the provider's limit less a margin, on a pool of
                    // its own.
                    let budget_pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(2)
                        .connect(&env.url)
                        .await
                        .expect("budget pool");
                    let per_second = (u64::from(args.rate_limit) * 95 / 100).max(1);
                    let quota = Quota::per_second(
                        NonZeroU32::new(u32::try_from(per_second).unwrap_or(u32::MAX))
                            .expect("positive"),
                    );
                    builder = builder.fleet_rate_limit(
                        PgRateLimit::with_table(budget_pool, quota, table).expect("budget"),
                    );
                }
                Client::Loadlock(
                    builder
                        .store(store)
                        .ttl(ttl)
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
    *sim.started.lock().unwrap() = started;
    let mut tasks = Vec::new();
    if let Some(trace) = &args.trace {
        // The log's requests at the log's times (sped up), spread over the
        // instances in turn; as many in flight as the log says.
        for (i, request) in trace.requests.iter().enumerate() {
            let client = clients[i % clients.len()].clone();
            let (waits, memo, store, progress) =
                (waits.clone(), memo.clone(), store.clone(), progress.clone());
            let at = started + Duration::from_secs_f64(request.at / args.speed);
            let keys = request.keys.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                let t = Instant::now();
                let tally = client
                    .request(&keys, &waits)
                    .await
                    .unwrap_or_else(|e| fail(&e));
                memo.fetch_add(tally.memo, Relaxed);
                store.fetch_add(tally.store, Relaxed);
                progress.inc(1);
                (keys, vec![t.elapsed()])
            }));
        }
    }
    for (i, client) in clients.iter().enumerate().filter(|_| args.trace.is_none()) {
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
                        Err(err) => fail(&err),
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
    // A client's requests in the order it made them (each of a trace's
    // requests is a client of its own, and they are not counted here); the
    // last turn takes every request from the `TURNS`th on.
    let mut by_turn: Vec<Vec<Duration>> = Vec::new();
    for task in join_all(tasks).await {
        let (asked, lat) = task.expect("client task");
        asked_all.extend(asked);
        if args.trace.is_none() {
            for (i, &latency) in lat.iter().enumerate() {
                let i = i.min(TURNS - 1);
                if by_turn.len() <= i {
                    by_turn.push(Vec::new());
                }
                by_turn[i].push(latency);
            }
        }
        latencies.extend(lat);
    }
    let wall = started.elapsed();

    let loads = asked_all.len() as u64;
    let distinct = asked_all.iter().collect::<HashSet<_>>().len() as u64;
    let provider_keys = sim.keys.load(Relaxed);
    let provider_calls = sim.calls.load(Relaxed);
    let refused = sim.refused.load(Relaxed);
    let calls_per_second = per_second(&sim.log.lock().unwrap());
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
    // Where loadlock's distinct keys live, per shard.
    let shard_keys: Vec<u64> = match routers.first() {
        Some(router) => {
            let mut per_shard = vec![0; router.shard_names().count()];
            for key in asked_all.iter().collect::<HashSet<_>>() {
                per_shard[router.shard_of(&namespace, key)] += 1;
            }
            per_shard
        }
        None => Vec::new(),
    };
    drop(routers);
    for pool in pools.iter().chain(&extra_pools) {
        pool.close().await;
    }
    latencies.sort();
    let pct = |p: f64| percentile_ms(&latencies, p);
    let mean_ms = if latencies.is_empty() {
        0.0
    } else {
        latencies.iter().map(Duration::as_secs_f64).sum::<f64>() * 1e3 / latencies.len() as f64
    };
    let p50_by_turn_ms = by_turn
        .iter_mut()
        .map(|turn| {
            turn.sort();
            percentile_ms(turn, 0.5)
        })
        .collect();
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
        mean_ms,
        p50_by_turn_ms,
        max_ms: pct(1.0),
        wall_s: wall.as_secs_f64(),
        refused,
        refused_share: if provider_calls + refused == 0 {
            0.0
        } else {
            refused as f64 / (provider_calls + refused) as f64
        },
        rate_limit_waits: waits,
        ttl_s,
        calls_per_second,
        throughput: latencies.len() as f64 / wall.as_secs_f64().max(f64::EPSILON),
        shard_keys,
    }
}

/// The latency at fraction `p` of `sorted`, in milliseconds (0 for none).
fn percentile_ms(sorted: &[Duration], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// Calls made and refused in each second since the start.
fn per_second(log: &[(f64, bool)]) -> Vec<(u64, u64)> {
    let mut seconds: Vec<(u64, u64)> = Vec::new();
    for &(at, refused) in log {
        let second = at.max(0.0) as usize;
        if seconds.len() <= second {
            seconds.resize(second + 1, (0, 0));
        }
        if refused {
            seconds[second].1 += 1;
        } else {
            seconds[second].0 += 1;
        }
    }
    seconds
}

impl Report {
    fn measured(&self) -> rounds::Measured {
        rounds::Measured {
            name: self.name,
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            wall_s: self.wall_s,
            duplicate_ratio: self.duplicate_ratio,
            provider_calls: self.provider_calls,
            refused: self.refused,
        }
    }
}

/// The most requests of a client told apart in [`Report::p50_by_turn_ms`].
const TURNS: usize = 8;

/// Each client's requests in order: how the latency of its first request
/// (when every client starts at once, on a cold cache) compares with the
/// later ones', next to the mean of all.
fn print_by_turn(reports: &[Report]) {
    let turns = reports
        .iter()
        .map(|r| r.p50_by_turn_ms.len())
        .max()
        .unwrap_or(0);
    if turns == 0 {
        return;
    }
    println!("\nmedian ms of each client's 1st, 2nd, ... request, and the mean ms of all:");
    let mut header = format!("{:<12} {:>8}", "strategy", "mean");
    for i in 1..=turns {
        // The last one a client may have is of all its later requests too.
        let label = if i == TURNS {
            format!("#{i}+")
        } else {
            format!("#{i}")
        };
        header.push_str(&format!(" {label:>8}"));
    }
    println!("{header}");
    for r in reports {
        let mut line = format!("{:<12} {:>8.1}", r.name, r.mean_ms);
        for p50 in &r.p50_by_turn_ms {
            line.push_str(&format!(" {p50:>8.1}"));
        }
        println!("{line}");
    }
}

fn print_table(reports: &[Report]) {
    println!(
        "{:<12} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>7}",
        "strategy", "loads", "calls", "p.keys", "distinct", "dup", "hit", "ideal", "memo", "coal", "store",
        "p50 ms", "p99 ms", "max ms", "wall s", "req/s", "429s", "429 %"
    );
    for r in reports {
        println!(
            "{:<12} {:>8} {:>8} {:>8} {:>8} {:>7.3} {:>7.3} {:>7.3} {:>5.1}% {:>5.1}% {:>5.1}% {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>7.0} {:>7} {:>6.2}%",
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
            r.throughput,
            r.refused,
            r.refused_share * 100.0,
        );
    }
    for r in reports.iter().filter(|r| r.shard_keys.len() > 1) {
        let total: u64 = r.shard_keys.iter().sum();
        let split: Vec<String> = r
            .shard_keys
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "shard-{i} {n} ({:.0}%)",
                    *n as f64 * 100.0 / total.max(1) as f64
                )
            })
            .collect();
        println!("{}: distinct keys per shard: {}", r.name, split.join(", "));
    }
}

#[tokio::main]
async fn main() {
    let args = Cli::parse().resolve();
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
    // Each loadlock instance also keeps one listener connection, and two
    // for its fleet budget.
    let extra = if args.fleet_limit { 3 } else { 1 };
    let needed = max_instances as u64 * (u64::from(args.pool_size) + extra) + 5;
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
    let budget_table = if args.fleet_limit {
        let table = format!("{}_budget", db.table());
        PgRateLimit::with_table(admin.clone(), Quota::per_second(NonZeroU32::MIN), &table)
            .expect("budget")
            .migrate()
            .await
            .expect("migrate the budget table");
        Some(table)
    } else {
        None
    };
    admin.close().await;
    // The other shards' servers: given, or throwaway clusters of the run.
    let mut clusters = Vec::new();
    let mut more_shards = Vec::new();
    for i in 1..args.shards {
        let url = match args.shard_urls.get(i - 1) {
            Some(url) => url.clone(),
            None => {
                let cluster = pg::PrivateCluster::start();
                let url = cluster.url();
                clusters.push(cluster);
                url
            }
        };
        // A schema of the run's own, dropped at the end.
        let schema = format!("loadlock_bench_{}", std::process::id());
        let table = format!("{schema}.cache");
        let pool = open_pools(&url, 1, 1).await.remove(0);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&pool)
        .await
        .expect("a shard's schema");
        PgStore::builder(pool.clone())
            .table(table.clone())
            .unlogged(true)
            .build()
            .expect("store")
            .migrate()
            .await
            .expect("migrate a shard");
        pool.close().await;
        more_shards.push((url, table));
    }
    let env = Env {
        args: args.clone(),
        url: db.url.clone(),
        table: db.table(),
        budget_table,
        more_shards,
        run_id: std::process::id().to_string(),
    };

    let per_run = |instances: usize| match (&args.trace, args.duration) {
        (Some(trace), _) => trace.requests.len() as u64,
        (None, None) => (instances * args.concurrency * args.requests) as u64,
        (None, Some(_)) => 0,
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

    let rounds = args.rounds.get();
    let mut reports = Vec::new();
    let mut measured = Vec::new();
    for round in 0..rounds {
        reports.clear();
        for kind in rounds::order(&kinds, round) {
            let label = if rounds > 1 {
                format!("{} {}/{rounds}", kind.name(), round + 1)
            } else {
                kind.name().to_string()
            };
            let pb = bar(per_run(args.instances), label);
            reports.push(run(&env, kind, args.instances, args.ttl, &pb).await);
            pb.finish_and_clear();
        }
        // Shown in the order asked for, whatever order they ran in.
        reports.sort_by_key(|r: &Report| kinds.iter().position(|k| k.name() == r.name));
        measured.push(reports.iter().map(Report::measured).collect::<Vec<_>>());
    }
    let summary = (rounds > 1).then(|| rounds::summarize(&measured));
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
            sweep.push(run(&env, kind, n, args.ttl, &pb).await);
            pb.finish_and_clear();
        }
    }
    let mut ttl_sweep = Vec::new();
    for &ttl in &args.sweep_ttl {
        let kind = Kind::Loadlock(FillMode::Lease);
        let pb = bar(per_run(args.instances), format!("ttl {ttl} s"));
        ttl_sweep.push(run(&env, kind, args.instances, ttl, &pb).await);
        pb.finish_and_clear();
    }

    let workload = match (&args.trace, &args.trace_path) {
        (Some(trace), Some(path)) => format!(
            "trace {}: {} loads of {} keys in {} requests over {:.0} s, replayed at {}x, over {} instances",
            path.display(),
            trace.loads,
            trace.keys,
            trace.requests.len(),
            trace.span(),
            args.speed,
            args.instances,
        ),
        _ => format!(
            "{} instances x {} concurrent requests x {} keys, Zipf({}) over {} keys, {}",
            args.instances,
            args.concurrency,
            args.keys_per_request,
            args.zipf,
            args.key_space,
            match args.duration {
                Some(d) => format!("{d} s per strategy"),
                None => format!("{} requests per client", args.requests),
            },
        ),
    };
    if args.json {
        let out = serde_json::json!({
            "workload": {
                "description": workload,
                "instances": args.instances,
                "concurrency": args.concurrency,
                "keys_per_request": args.keys_per_request,
                "key_space": args.key_space,
                "zipf": args.zipf,
                "requests_per_client": args.requests,
                "duration_s": args.duration,
                "trace": args.trace_path,
                "speed": args.speed,
                "ttl_s": args.ttl,
                "latency_ms": args.latency_ms,
                "jitter": args.jitter,
                "network_ms": args.network.as_secs_f64() * 1000.0,
                "rate_limit": args.rate_limit,
                "fleet_limit": args.fleet_limit,
                "shards": args.shards,
                "max_batch": args.max_batch,
                "pool_size": args.pool_size,
                "lanes": args.lanes,
                "rounds": args.rounds,
            },
            "strategies": reports,
            "rounds": if rounds > 1 { serde_json::json!(measured) } else { serde_json::Value::Null },
            "medians": summary,
            "sweep": sweep,
            "ttl_sweep": ttl_sweep,
        });
        println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    } else {
        println!(
            "{workload}; provider {} ms{} {}, {} calls/s for the fleet, max batch {}; TTL {} s; pools of {}; loadlock {}, {} lane{}, on {} shard{}\n",
            args.latency_ms,
            if args.jitter > 0.0 {
                format!(" ± {}%", args.jitter * 100.0)
            } else {
                String::new()
            },
            if args.network.is_zero() {
                "with no network".to_string()
            } else {
                format!("over a network of 0–{} ms", args.network.as_secs_f64() * 1000.0)
            },
            args.rate_limit,
            args.max_batch,
            args.ttl,
            args.pool_size,
            if args.fleet_limit {
                "with a fleet budget (PgRateLimit) at 95% of the limit"
            } else {
                "without a fleet budget"
            },
            args.lanes,
            if args.lanes.get() == 1 { "" } else { "s" },
            args.shards,
            if args.shards == 1 { "" } else { "s" },
        );
        print_table(&reports);
        print_by_turn(&reports);
        if let Some(summary) = &summary {
            println!(
                "\nmedians of {rounds} rounds (the tables above are of the last; order alternating):"
            );
            rounds::print(summary);
        }
        if !sweep.is_empty() {
            println!("\nhit ratio by instance count:");
            print_table(&sweep);
        }
        if !ttl_sweep.is_empty() {
            println!("\nloadlock by TTL:");
            println!(
                "{:>10} {:>7} {:>8} {:>8} {:>8} {:>8}",
                "ttl s", "hit", "calls", "p.keys", "p50 ms", "p99 ms"
            );
            for r in &ttl_sweep {
                println!(
                    "{:>10} {:>7.3} {:>8} {:>8} {:>8.1} {:>8.1}",
                    r.ttl_s, r.hit_ratio, r.provider_calls, r.provider_keys, r.p50_ms, r.p99_ms
                );
            }
        }
    }
    if let Some(path) = &args.plot {
        let limit = f64::from(args.rate_limit);
        plot::draw(path, &reports, &sweep, &ttl_sweep, limit).expect("plot");
        eprintln!("plot written to {}", path.display());
    }
    for (url, table) in &env.more_shards {
        let schema = table.split('.').next().unwrap_or_default();
        let pool = open_pools(url, 1, 1).await.remove(0);
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await;
        pool.close().await;
    }
    drop(clusters);
    db.cleanup().await;
}
