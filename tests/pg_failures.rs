//! The fleet when parts of it fail mid-fill, on real Postgres: a lease
//! holder killed with SIGKILL (a separate OS process), an instance whose
//! connections are terminated by the server, a network gone silent with
//! connections open, and a server restart. Nobody hangs; every wait here
//! is bounded by a guard far above what the protocol needs.

mod support;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, Cache, Error, FillMode, Invalidation, LockMode, PgStore, RetryPolicy};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection};
use support::pg::{PrivateCluster, TestDb};
use support::{value_of, Fake};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;

const CHILD_ENV: &str = "LOADLOCK_KILLED_HOLDER";
const NAMESPACE: &str = "failures/killed";
const KEYS: u64 = 20;

/// Logs every key it is asked for to a file shared by the processes, then
/// answers, or (in the holder that will be killed) hangs.
struct Logging {
    log: Mutex<std::fs::File>,
    /// Written once the call started, for the parent to kill the holder.
    calling: Option<PathBuf>,
}

#[async_trait::async_trait]
impl BatchFetch for Logging {
    type Key = u64;
    type Value = String;
    type Error = std::io::Error;

    fn namespace(&self) -> &str {
        NAMESPACE
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, std::io::Error> {
        let lines: String = keys.iter().map(|k| format!("{k}\n")).collect();
        {
            let mut log = self.log.lock().unwrap();
            log.write_all(lines.as_bytes())?;
            log.flush()?;
        }
        if let Some(calling) = &self.calling {
            std::fs::write(calling, b"")?;
            // Killed long before this ends.
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
        Ok(keys.iter().map(|k| (*k, value_of(k))).collect())
    }
}

fn logging(dir: &Path, calling: Option<PathBuf>) -> Logging {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fetched"))
        .unwrap();
    Logging {
        log: Mutex::new(log),
        calling,
    }
}

/// A cache whose leases are short: a provider call may take 2 s, once, so
/// a lease lasts 2 s plus its margin.
async fn short_lease_cache(url: &str, table: &str, provider: Logging) -> Cache<Logging> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .unwrap();
    let store = PgStore::builder(pool).table(table).build().unwrap();
    Cache::builder(provider)
        .store(store)
        .provider_timeout(Duration::from_secs(2))
        .retry(RetryPolicy::none())
        .build()
        .unwrap()
}

/// A child process claims the keys and is killed with SIGKILL during its
/// provider call, leases held. Another instance waits for the leases, takes
/// them over once they expire, and loads every key; each key is fetched at
/// most twice (once by the dead holder), and nobody hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_lease_holder_is_taken_over() {
    if std::env::var(CHILD_ENV).is_ok() {
        return killed_holder().await;
    }
    let db = TestDb::new("killed").await;
    db.store(LockMode::PerKey).await; // migrate once up front
    let dir = std::env::temp_dir().join(format!("loadlock-killed-{}", db.schema));
    std::fs::create_dir_all(&dir).unwrap();
    let mut holder = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_killed_lease_holder_is_taken_over",
            "--nocapture",
        ])
        .env(CHILD_ENV, "1")
        .env("LOADLOCK_KILLED_URL", &db.url)
        .env("LOADLOCK_KILLED_TABLE", db.table())
        .env("LOADLOCK_KILLED_DIR", &dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn the holder");
    wait_for_file(&dir.join("calling")).await;
    let leased: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE lease_token IS NOT NULL",
        db.table()
    )))
    .fetch_one(&mut PgConnection::connect(&db.url).await.unwrap())
    .await
    .unwrap();
    assert_eq!(leased, KEYS as i64, "the holder leased every key");
    holder.kill().expect("SIGKILL the holder");
    holder.wait().unwrap();

    let cache = short_lease_cache(&db.url, &db.table(), logging(&dir, None)).await;
    let started = Instant::now();
    let loaded = tokio::time::timeout(Duration::from_secs(60), cache.loader().load_many(0..KEYS))
        .await
        .expect("a load behind a dead holder's leases must not hang")
        .unwrap();
    eprintln!(
        "loaded {} keys {:?} after the holder was killed",
        loaded.len(),
        started.elapsed()
    );
    assert_eq!(loaded.len(), KEYS as usize);
    assert_eq!(loaded[&7], value_of(&7));
    let stats = cache.stats();
    assert_eq!(stats.lease_takeovers, KEYS);
    assert!(stats.lease_waits >= KEYS, "{stats:?}");

    let mut fetches: HashMap<u64, usize> = HashMap::new();
    for line in std::fs::read_to_string(dir.join("fetched"))
        .unwrap()
        .lines()
    {
        *fetches.entry(line.parse().unwrap()).or_default() += 1;
    }
    assert_eq!(fetches.len(), KEYS as usize);
    assert!(
        fetches.values().all(|&n| n == 2),
        "each key fetched by the dead holder and once more: {fetches:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    db.cleanup().await;
}

/// The holder: claims every key, tells the parent it is at the provider,
/// and hangs there until killed.
async fn killed_holder() {
    let url = std::env::var("LOADLOCK_KILLED_URL").unwrap();
    let table = std::env::var("LOADLOCK_KILLED_TABLE").unwrap();
    let dir = PathBuf::from(std::env::var("LOADLOCK_KILLED_DIR").unwrap());
    let provider = logging(&dir, Some(dir.join("calling")));
    let cache = short_lease_cache(&url, &table, provider).await;
    let _ = cache.loader().load_many(0..KEYS).await;
}

async fn wait_for_file(path: &Path) {
    let started = Instant::now();
    while !path.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{path:?} never appeared"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Terminates every session whose last statement named `schema` (the
/// test's stores' pooled connections), except the caller's.
async fn terminate_sessions_of(db: &TestDb) -> i64 {
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
    )
    .bind(&db.schema)
    .fetch_one(&mut conn)
    .await
    .unwrap()
}

/// An instance's connections are terminated by the server while its fill
/// is at the provider: nobody hangs, the other instance is served, and the
/// instance works again without being rebuilt. With leases the fill holds
/// no connection then, so it completes; with held transactions its
/// transaction dies with the connection, and the load fails with a store
/// error instead of hanging.
async fn terminated_mid_fill(fill: FillMode, tag: &str) {
    let db = TestDb::new(tag).await;
    let namespace = format!("failures/{tag}");
    let gate = Arc::new(Semaphore::new(0));
    let first = Fake::<u64>::builder(namespace.as_str())
        .gate(gate.clone())
        .build();
    let a = Cache::builder(first.clone())
        .store(db.store_with(LockMode::PerKey, fill).await)
        .build()
        .unwrap();
    let b = Cache::builder(Fake::<u64>::new(namespace.as_str()))
        .store(db.store_with(LockMode::PerKey, fill).await)
        .build()
        .unwrap();
    b.loader().load(1_000).await.unwrap(); // B has a pooled connection

    let a_load = tokio::spawn({
        let a = a.clone();
        async move { a.loader().load_many(0..10).await }
    });
    let started = Instant::now();
    while first.call_count() == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "A never called"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let terminated = terminate_sessions_of(&db).await;
    assert!(terminated > 0, "no session was terminated");

    // The other instance is served meanwhile.
    let guard = Duration::from_secs(60);
    let other = tokio::time::timeout(guard, b.loader().load_many(100..110))
        .await
        .expect("B must not hang");
    assert_eq!(other.unwrap().len(), 10);

    gate.add_permits(1);
    let outcome = tokio::time::timeout(guard, a_load)
        .await
        .expect("A's load must not hang")
        .unwrap();
    match fill {
        FillMode::Lease => assert_eq!(outcome.unwrap().len(), 10),
        _ => assert!(matches!(outcome, Err(Error::Store { .. })), "{outcome:?}"),
    }

    // A works again, the same Cache.
    gate.add_permits(100);
    let again = tokio::time::timeout(guard, a.loader().load_many(200..210))
        .await
        .expect("A must not hang afterwards");
    assert_eq!(again.unwrap().len(), 10);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_mid_fill_with_leases() {
    terminated_mid_fill(FillMode::Lease, "terminated_lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_mid_fill_with_held_transactions() {
    terminated_mid_fill(FillMode::HeldTransaction, "terminated_held").await;
}

/// A relay between the store and the server that can stop passing bytes
/// on, both ways, while every connection stays open: a half-open network
/// (a peer gone without a word, a firewall dropping packets).
struct Relay {
    port: u16,
    frozen: Arc<AtomicBool>,
}

impl Relay {
    /// Relays new connections on a local port to the server of `options`.
    async fn start(options: &PgConnectOptions) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let (host, server_port) = (options.get_host().to_owned(), options.get_port());
        let relaying = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                // A host that is a directory is the server's socket's.
                if host.starts_with('/') {
                    let socket = format!("{host}/.s.PGSQL.{server_port}");
                    if let Ok(server) = UnixStream::connect(socket).await {
                        relay(client, server, &relaying);
                    }
                } else if let Ok(server) = TcpStream::connect((host.as_str(), server_port)).await {
                    relay(client, server, &relaying);
                }
            }
        });
        Relay { port, frozen }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.store(frozen, Ordering::SeqCst);
    }
}

/// Passes bytes between `client` and `server`, both ways, in tasks of
/// their own.
fn relay<C, S>(client: C, server: S, frozen: &Arc<AtomicBool>)
where
    C: AsyncRead + AsyncWrite + Send + 'static,
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(client);
    let (server_read, server_write) = tokio::io::split(server);
    tokio::spawn(pass_on(client_read, server_write, frozen.clone()));
    tokio::spawn(pass_on(server_read, client_write, frozen.clone()));
}

/// Passes bytes from `from` to `to`, holding them while `frozen`; ends
/// when either side closes.
async fn pass_on(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while frozen.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The network to the server goes silent with connections open (nothing
/// is closed, nothing answers): loads fail with a store error within the
/// query timeout instead of hanging, hits and misses alike; once the
/// network is back, the same `Cache` works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_half_open_connection_fails_loads_instead_of_hanging_them() {
    let db = TestDb::new("halfopen").await;
    let options = PgConnectOptions::from_str(&db.url).unwrap();
    let relay = Relay::start(&options).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.host("127.0.0.1").port(relay.port))
        .await
        .unwrap();
    let query_timeout = Duration::from_secs(1);
    let store = PgStore::builder(pool)
        .table(db.table())
        .query_timeout(query_timeout)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let provider = Fake::<u64>::new("failures/halfopen");
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    assert_eq!(cache.loader().load_many(0..5).await.unwrap().len(), 5);

    relay.freeze(true);
    let guard = Duration::from_secs(30);
    for (what, keys) in [("hits", 0..5), ("misses", 100..105)] {
        let started = Instant::now();
        let outcome = tokio::time::timeout(guard, cache.loader().load_many(keys))
            .await
            .unwrap_or_else(|_| panic!("loads of {what} hung on a silent network"));
        assert!(
            matches!(outcome, Err(Error::Store { .. })),
            "{what}: {outcome:?}"
        );
        assert!(started.elapsed() >= query_timeout, "{what}: {outcome:?}");
    }
    assert_eq!(provider.keys_fetched(), 5, "no miss was fetched meanwhile");

    relay.freeze(false);
    let again = tokio::time::timeout(guard, cache.loader().load_many(0..10))
        .await
        .expect("loads must not hang afterwards");
    assert_eq!(again.unwrap().len(), 10);
    assert_eq!(provider.keys_fetched(), 10);
    db.cleanup().await;
}

/// The server restarts mid-run: meanwhile loads fail fast with an error
/// (never hang); afterwards the same `Cache` works again, and
/// `invalidations()` reports `Missed` and then delivers events again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_restarts_mid_run() {
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(2))
        .connect(&cluster.url())
        .await
        .unwrap();
    let store = PgStore::builder(pool)
        .query_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let cache = Cache::builder(Fake::<u64>::new("failures/restart"))
        .store(store.clone())
        .build()
        .unwrap();
    let mut events = cache.invalidations();
    cache.loader().load_many(0..5).await.unwrap();
    // Listening: an invalidation comes back as an event.
    cache.invalidate([1]).await.unwrap();
    let guard = Duration::from_secs(30);
    expect_event(
        &mut events,
        guard,
        |e| matches!(e, Invalidation::Keys(k) if k == &["1".to_string()]),
    )
    .await;

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop();
        cluster
    })
    .await
    .unwrap();
    let asked = Instant::now();
    let down = tokio::time::timeout(guard, cache.loader().load(10))
        .await
        .expect("a load while the server is down must fail, not hang");
    eprintln!(
        "while the server was down, a load failed in {:?}: {down:?}",
        asked.elapsed()
    );
    assert!(matches!(down, Err(Error::Store { .. })), "{down:?}");
    // Reported as soon as the listener's connection is lost: well within
    // the pool's acquire timeout (30 s), which a listener reconnecting
    // before reporting would wait out.
    let asked = Instant::now();
    expect_event(&mut events, Duration::from_secs(10), |e| {
        matches!(e, Invalidation::Missed)
    })
    .await;
    eprintln!("`Missed` came {:?} after the failed load", asked.elapsed());

    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start_again();
        cluster
    })
    .await
    .unwrap();
    // The same Cache works again once the pool has reconnected.
    let started = Instant::now();
    let value = loop {
        match cache.loader().load(10).await {
            Ok(value) => break value,
            Err(err) => {
                assert!(started.elapsed() < guard, "no recovery: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(value, Some(value_of(&10)));
    // Events flow again (the listener reconnects and reports `Missed` once
    // listening; an invalidation then arrives as an event).
    let started = Instant::now();
    loop {
        cache.invalidate([2]).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match futures::StreamExt::next(&mut events).await {
                    Some(Invalidation::Keys(keys)) if keys == ["2".to_string()] => return true,
                    Some(_) => {}
                    None => return false,
                }
            }
        })
        .await;
        if next == Ok(true) {
            break;
        }
        assert!(started.elapsed() < guard, "events never flowed again");
    }
    drop(cache);
    drop(store);
    drop(cluster);
}

async fn expect_event(
    events: &mut (impl futures::Stream<Item = Invalidation> + Unpin),
    guard: Duration,
    wanted: impl Fn(&Invalidation) -> bool,
) {
    tokio::time::timeout(guard, async {
        loop {
            let event = futures::StreamExt::next(events)
                .await
                .expect("the event stream ended");
            if wanted(&event) {
                return;
            }
        }
    })
    .await
    .expect("the expected event never came");
}

/// Keys the provider fails alone fail alone on Postgres too, in both fill
/// modes: the others are published, the failed ones leave no fresh row
/// (not even a negative entry) and no lease behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_the_provider_fails_alone_fail_alone_on_postgres() {
    let db = TestDb::new("per_key_fail").await;
    for fill in [FillMode::Lease, FillMode::HeldTransaction] {
        let namespace = format!("pg/per-key/{fill:?}");
        let provider = support::PerKey::new(&namespace, [7, 42, 99], []);
        let cache = Cache::builder(provider.clone())
            .store(db.store_with(LockMode::PerKey, fill).await)
            .build()
            .unwrap();
        support::three_keys_of_a_hundred_fail(&cache, &provider).await;
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        let (rows, leased): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FILTER (WHERE expires_at > now()), count(lease_token) \
             FROM {} WHERE namespace = $1",
            db.table()
        )))
        .bind(&namespace)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        assert_eq!((rows, leased), (97, 0), "{fill:?}");
    }
    db.cleanup().await;
}
