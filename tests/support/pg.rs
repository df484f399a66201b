//! A PostgreSQL server for the tests, on any machine, and an isolated schema
//! per test.
//!
//! The server is found in this order:
//!
//! 1. `DATABASE_URL`, if set (tests create their schemas in that database);
//! 2. a server on `127.0.0.1:5432` that lets `postgres` in without a
//!    password (tests use a database `loadlock_test` there, created once);
//! 3. a throwaway cluster started from the installed server binaries
//!    (`pg_ctl` on `PATH` or under `/usr/lib/postgresql/*/bin`) in a
//!    temporary directory on a free port. It is shared by every test process
//!    of a run: the first one starts it under a directory lock, the others
//!    find it; each process touches a heartbeat file while it runs, and a
//!    watchdog stops the cluster and deletes it about 15 s after the last
//!    heartbeat. As root (initdb refuses to run as root) the binaries run as
//!    the `postgres` user through `setpriv`.
//!
//! `LOADLOCK_TEST_PG=throwaway` skips 1 and 2.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use loadlock::{FillMode, LockMode, PgRateLimit, PgStore, Quota};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};

const TEST_DATABASE: &str = "loadlock_test";
const FIX: &str = "set DATABASE_URL to a PostgreSQL server, start one on 127.0.0.1:5432 \
                   with trust authentication, or install the server binaries \
                   (Debian: apt-get install postgresql)";

/// The URL of the database the tests use, found or started once per process.
pub async fn database_url() -> String {
    static URL: tokio::sync::OnceCell<String> = tokio::sync::OnceCell::const_new();
    URL.get_or_init(find_or_start).await.clone()
}

async fn find_or_start() -> String {
    let forced = std::env::var("LOADLOCK_TEST_PG").as_deref() == Ok("throwaway");
    if !forced {
        if let Ok(url) = std::env::var("DATABASE_URL") {
            return url;
        }
        let local = "postgres://postgres@127.0.0.1:5432/postgres";
        if answers(local).await {
            return with_test_database(local).await;
        }
    }
    let port = tokio::task::spawn_blocking(throwaway::start_or_join)
        .await
        .expect("starting the throwaway cluster");
    with_test_database(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await
}

async fn answers(url: &str) -> bool {
    let Ok(options) = url.parse::<PgConnectOptions>() else {
        return false;
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(3), options.connect()).await,
        Ok(Ok(_))
    )
}

/// Creates `loadlock_test` on the server at `admin_url` (once; tolerating
/// other processes doing the same) and returns its URL.
async fn with_test_database(admin_url: &str) -> String {
    let mut conn = PgConnection::connect(admin_url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {admin_url}: {e}; {FIX}"));
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(TEST_DATABASE)
            .fetch_one(&mut conn)
            .await
            .expect("listing databases");
    if !exists {
        if let Err(err) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE {TEST_DATABASE}"
        )))
        .execute(&mut conn)
        .await
        {
            // Another test process created it first.
            let code = err.as_database_error().and_then(|e| e.code());
            assert!(
                matches!(code.as_deref(), Some("42P04") | Some("23505")),
                "creating {TEST_DATABASE}: {err}"
            );
        }
    }
    let _ = conn.close().await;
    let base = admin_url
        .rsplit_once('/')
        .map_or(admin_url, |(base, _)| base);
    format!("{base}/{TEST_DATABASE}")
}

/// An isolated schema for one test; dropped by [`TestDb::cleanup`].
pub struct TestDb {
    pub url: String,
    pub schema: String,
}

impl TestDb {
    pub async fn new(tag: &str) -> TestDb {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let url = database_url().await;
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let schema = format!(
            "t_{tag}_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = PgConnection::connect(&url).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut conn)
            .await
            .expect("create schema");
        let _ = conn.close().await;
        TestDb { url, schema }
    }

    /// A pool standing for one service instance.
    pub async fn pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&self.url)
            .await
            .expect("pool")
    }

    pub fn table(&self) -> String {
        format!("{}.cache", self.schema)
    }

    /// A migrated store on a new pool.
    pub async fn store(&self, mode: LockMode) -> PgStore {
        self.store_with(mode, FillMode::default()).await
    }

    /// A migrated store on a new pool, filling with `fill`.
    pub async fn store_with(&self, mode: LockMode, fill: FillMode) -> PgStore {
        let store = PgStore::builder(self.pool(4).await)
            .table(self.table())
            .lock_mode(mode)
            .fill_mode(fill)
            .build()
            .expect("store");
        store.migrate().await.expect("migrate");
        store
    }

    /// The table of this test's fleet budgets.
    pub fn budget_table(&self) -> String {
        format!("{}.rate_limit", self.schema)
    }

    /// A migrated fleet budget of `quota` in [`budget_table`](Self::budget_table),
    /// on a new pool: one instance's.
    pub async fn budget(&self, quota: Quota) -> PgRateLimit {
        let budget = PgRateLimit::with_table(self.pool(2).await, quota, &self.budget_table())
            .expect("budget");
        budget.migrate().await.expect("migrate the budget");
        budget
    }

    /// How many provider calls shared by the fleet are open in the cache
    /// table's `_calls`.
    pub async fn open_calls(&self) -> i64 {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        let open = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM {}_calls",
            self.table()
        )))
        .fetch_one(&mut conn)
        .await
        .expect("count the open calls");
        let _ = conn.close().await;
        open
    }

    pub async fn cleanup(self) {
        let mut conn = PgConnection::connect(&self.url).await.expect("connect");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&mut conn)
        .await
        .expect("drop schema");
        let _ = conn.close().await;
    }
}

/// A cluster of one test's own, which the test may stop and start again
/// (the shared one serves every other test meanwhile). Needs the server
/// binaries. Stopped and deleted on drop; a watchdog does the same if the
/// test process dies (no heartbeat for 15 s).
pub struct PrivateCluster {
    bin: PathBuf,
    base: PathBuf,
    port: u16,
    as_postgres: bool,
    alive: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let bin = throwaway::server_binaries().unwrap_or_else(|| {
            panic!("this test restarts a server of its own and needs the PostgreSQL server binaries: {FIX}")
        });
        let as_postgres = throwaway::is_root();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let base = std::env::temp_dir().join(format!(
            "loadlock-private-pg-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        throwaway::init(&bin, &base, as_postgres);
        let alive = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        {
            let (alive, heartbeat) = (alive.clone(), base.join("heartbeat"));
            std::thread::spawn(move || {
                while alive.load(Ordering::Relaxed) {
                    let _ = std::fs::write(&heartbeat, b"");
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        let port = throwaway::free_port();
        throwaway::pg_ctl_start(&bin, &base, port, as_postgres);
        throwaway::spawn_watchdog(&bin, &base, as_postgres);
        PrivateCluster {
            bin,
            base,
            port,
            as_postgres,
            alive,
        }
    }

    /// The URL of its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server (`fast`: every session is ended).
    pub fn stop(&self) {
        throwaway::pg_ctl_stop(&self.bin, &self.base, "fast", self.as_postgres);
    }

    /// Starts the stopped server again, on the same port, with its data.
    pub fn start_again(&self) {
        throwaway::pg_ctl_start(&self.bin, &self.base, self.port, self.as_postgres);
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::Relaxed);
        let _ = throwaway::pg_command(&self.bin, "pg_ctl", self.as_postgres)
            .arg("-D")
            .arg(self.base.join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

mod throwaway {
    use super::*;

    /// Where the shared cluster of this checkout lives.
    fn base() -> PathBuf {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for b in env!("CARGO_MANIFEST_DIR").bytes() {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        std::env::temp_dir().join(format!("loadlock-test-pg-{hash:016x}"))
    }

    /// Returns the port of the shared cluster, starting it if needed.
    pub(super) fn start_or_join() -> u16 {
        let base = base();
        let _lock = DirLock::take(&base.with_extension("lock"));
        heartbeat(&base);
        if let Some(port) = running_port(&base) {
            return port;
        }
        start(&base)
    }

    fn running_port(base: &Path) -> Option<u16> {
        let port: u16 = std::fs::read_to_string(base.join("port"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        Some(port)
    }

    fn start(base: &Path) -> u16 {
        let bin = server_binaries().unwrap_or_else(|| panic!("no PostgreSQL server found: {FIX}"));
        let as_postgres = is_root();
        init(&bin, base, as_postgres);
        let port = free_port();
        pg_ctl_start(&bin, base, port, as_postgres);
        std::fs::write(base.join("port"), port.to_string()).expect("port file");
        spawn_watchdog(&bin, base, as_postgres);
        port
    }

    /// A new cluster in `base/data`.
    pub(super) fn init(bin: &Path, base: &Path, as_postgres: bool) {
        let _ = std::fs::remove_dir_all(base.join("data"));
        std::fs::create_dir_all(base).expect("cluster directory");
        if as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres:").arg(base));
        }
        let data = base.join("data");
        run(pg_command(bin, "initdb", as_postgres)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]));
    }

    /// Starts the cluster in `base/data` on `port` and waits until it
    /// accepts connections.
    pub(super) fn pg_ctl_start(bin: &Path, base: &Path, port: u16, as_postgres: bool) {
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300 \
             -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            base.display()
        );
        run(pg_command(bin, "pg_ctl", as_postgres)
            .arg("-D")
            .arg(base.join("data"))
            .arg("-l")
            .arg(base.join("log"))
            .args(["-w", "-t", "60", "-o", &options, "start"]));
        for _ in 0..120 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Stops the cluster in `base/data` (`mode`: `fast` or `immediate`).
    pub(super) fn pg_ctl_stop(bin: &Path, base: &Path, mode: &str, as_postgres: bool) {
        run(pg_command(bin, "pg_ctl", as_postgres)
            .arg("-D")
            .arg(base.join("data"))
            .args(["-w", "-m", mode, "stop"]));
    }

    /// Stops and deletes the cluster once no test process has touched the
    /// heartbeat for 15 s.
    pub(super) fn spawn_watchdog(bin: &Path, base: &Path, as_postgres: bool) {
        let stop = format!(
            "{} {}/pg_ctl -D {}/data -m immediate stop",
            if as_postgres {
                "setpriv --reuid=postgres --regid=postgres --init-groups"
            } else {
                ""
            },
            bin.display(),
            base.display()
        );
        let script = format!(
            "while sleep 2; do \
               age=$(( $(date +%s) - $(stat -c %Y {hb} 2>/dev/null || echo 0) )); \
               if [ \"$age\" -gt 15 ]; then {stop}; rm -rf {base}; exit 0; fi; \
             done",
            hb = base.join("heartbeat").display(),
            base = base.display(),
        );
        // `setsid --fork` returns at once, leaving the watchdog in a session
        // of its own that outlives this process.
        let status = Command::new("setsid")
            .args(["--fork", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawning the cluster watchdog");
        assert!(status.success(), "spawning the cluster watchdog: {status}");
    }

    /// Touches the heartbeat file every second for as long as this process
    /// lives.
    fn heartbeat(base: &Path) {
        static STARTED: OnceLock<()> = OnceLock::new();
        let file = base.join("heartbeat");
        let _ = std::fs::create_dir_all(base);
        let _ = std::fs::write(&file, b"");
        STARTED.get_or_init(|| {
            std::thread::spawn(move || loop {
                let _ = std::fs::write(&file, b"");
                std::thread::sleep(Duration::from_secs(1));
            });
        });
    }

    pub(super) fn server_binaries() -> Option<PathBuf> {
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
                    return Some(dir);
                }
            }
        }
        let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let version = entry.file_name().to_str()?.parse().ok()?;
                let bin = entry.path().join("bin");
                bin.join("pg_ctl").is_file().then_some((version, bin))
            })
            .collect();
        found.sort();
        found.pop().map(|(_, bin)| bin)
    }

    pub(super) fn pg_command(bin: &Path, tool: &str, as_postgres: bool) -> Command {
        let mut command = if as_postgres {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
                .arg(bin.join(tool));
            c
        } else {
            Command::new(bin.join(tool))
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn run(command: &mut Command) {
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("running {command:?}: {e}; {FIX}"));
        assert!(
            output.status.success(),
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    pub(super) fn is_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false)
    }

    pub(super) fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    /// A lock across processes: an exclusive directory creation. A lock left
    /// by a crashed process is taken over after two minutes.
    struct DirLock(PathBuf);

    impl DirLock {
        fn take(path: &Path) -> DirLock {
            loop {
                match std::fs::create_dir(path) {
                    Ok(()) => return DirLock(path.to_owned()),
                    Err(_) => {
                        let stale = std::fs::metadata(path)
                            .and_then(|m| m.modified())
                            .ok()
                            .and_then(|t| t.elapsed().ok())
                            .is_some_and(|age| age > Duration::from_secs(120));
                        if stale {
                            let _ = std::fs::remove_dir(path);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
    }

    impl Drop for DirLock {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

/// A throwaway PgBouncer in transaction mode in front of the test server:
/// the `pgbouncer` binary on `PATH` (or `/usr/sbin`), a free port, stopped
/// when dropped (and, should the test process die, by a watchdog).
pub struct PgBouncer {
    dir: PathBuf,
    port: u16,
    database: String,
    user: String,
}

impl PgBouncer {
    pub async fn start() -> PgBouncer {
        let upstream: PgConnectOptions = database_url().await.parse().expect("test URL");
        let binary = std::env::var_os("PATH")
            .into_iter()
            .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
            .chain([PathBuf::from("/usr/sbin")])
            .map(|dir| dir.join("pgbouncer"))
            .find(|candidate| candidate.is_file())
            .unwrap_or_else(|| {
                panic!("these tests run through PgBouncer: install it (Debian: apt-get install pgbouncer)")
            });
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "loadlock-pgbouncer-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let port = throwaway::free_port();
        let database = upstream.get_database().unwrap_or("postgres").to_owned();
        let user = upstream.get_username().to_owned();
        let config = format!(
            "[databases]\n\
             {database} = host={host} port={upstream_port} dbname={database} user={user}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {dir}/users.txt\n\
             pool_mode = transaction\n\
             max_client_conn = 2000\n\
             default_pool_size = 40\n\
             ignore_startup_parameters = extra_float_digits\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n",
            host = upstream.get_host(),
            upstream_port = upstream.get_port(),
            dir = dir.display(),
        );
        std::fs::write(dir.join("pgbouncer.ini"), config).expect("pgbouncer.ini");
        std::fs::write(dir.join("users.txt"), format!("\"{user}\" \"\"\n")).expect("users");
        // PgBouncer refuses to run as root.
        let as_postgres = throwaway::is_root();
        let mut command = if as_postgres {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let _ = std::process::Command::new("chown")
                    .args(["postgres", &entry.path().display().to_string()])
                    .status();
            }
            let _ = std::process::Command::new("chown")
                .args(["postgres", &dir.display().to_string()])
                .status();
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&binary);
            c
        } else {
            std::process::Command::new(&binary)
        };
        let status = command
            .arg("-d")
            .arg(dir.join("pgbouncer.ini"))
            .status()
            .expect("starting pgbouncer");
        assert!(
            status.success(),
            "pgbouncer did not start; see {}",
            dir.display()
        );
        let bouncer = PgBouncer {
            dir,
            port,
            database,
            user,
        };
        // A watchdog: stops it if this process dies first.
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill $(cat {}/pgbouncer.pid) 2>/dev/null",
                std::process::id(),
                bouncer.dir.display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !answers(&bouncer.url()).await {
            assert!(
                std::time::Instant::now() < deadline,
                "pgbouncer does not answer; see {}",
                bouncer.dir.display()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bouncer
    }

    /// The test database, through PgBouncer.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.user, self.port, self.database
        )
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pgbouncer.pid")) {
            let _ = std::process::Command::new("kill").arg(pid.trim()).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TestDb {
    /// A migrated store whose pool goes through `bouncer` (unprepared
    /// statements), its listener on a direct connection.
    pub async fn store_through(
        &self,
        bouncer: &PgBouncer,
        mode: LockMode,
        fill: FillMode,
    ) -> PgStore {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(60))
            .connect(&bouncer.url())
            .await
            .expect("pool through pgbouncer");
        let store = PgStore::builder(pool)
            .table(self.table())
            .lock_mode(mode)
            .fill_mode(fill)
            .prepared_statements(false)
            .listener_url(self.url.clone())
            .build()
            .expect("store");
        store.migrate().await.expect("migrate through pgbouncer");
        store
    }
}
