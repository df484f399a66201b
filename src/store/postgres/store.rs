//! [`PgStore`] and its builder: the settings, the connection discipline
//! (every round trip bounded, a timed-out connection discarded), and the
//! [`Store`] implementation that hands each operation to its room.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool};

use super::combine::Groups;
use super::conn::{Conn, Entered, Lanes};
use super::events;
use super::lease::{ClaimAnswer, ClaimRequest, PublishGroup, PublishRequest};
use super::preclaim::Learned;
use super::read::{ReadAnswer, ReadGroup, ReadRequest};
use super::rows::Written;
use super::sql::Statements;
use super::table::TableName;
use super::waiters::Waiters;
use crate::store::{Fill, Filled, Lookup, Store};
use crate::{BatchFetch, Error, StoreEvent};

/// The default table: `loadlock_cache`, in the connection's search path.
const DEFAULT_TABLE: &str = "loadlock_cache";

/// How many of the protocol's short statements one store runs at a time
/// by default (see [`PgStoreBuilder::lanes`]).
pub const DEFAULT_LANES: NonZeroUsize = NonZeroUsize::MIN;

/// How a fill locks what it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LockMode {
    /// One advisory lock per key (the default): fills of disjoint keys run
    /// concurrently, fills of the same key are serialized.
    #[default]
    PerKey,
    /// One advisory lock per namespace, held for the whole fill: at most one
    /// fill of the namespace runs at a time across the fleet ("serial
    /// batches"), for providers that forbid concurrent calls. Holding the
    /// lock across the provider call is the point of this mode, so it always
    /// fills with [`FillMode::HeldTransaction`]. Exactly-once holds the same
    /// way.
    Namespace,
}

/// How a fill keeps other fills of its keys away while it calls the
/// provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FillMode {
    /// Leases (the default): a short transaction records a lease on each
    /// missing key and commits; the provider is called holding no
    /// connection, no transaction and no lock; the values are published
    /// only where the lease is still this fill's. Other fills of a leased
    /// key wait for its publish (woken by a notification), or take the lease
    /// over once it has expired (its holder died). Hits never wait for
    /// fills, and a slow provider never occupies the pool.
    #[default]
    Lease,
    /// The older protocol: one transaction per fill holds a connection and
    /// the keys' advisory locks across the provider call. A holder that dies
    /// releases its keys at once (its session ends), where a lease must
    /// expire first; but every fill in progress occupies a pooled
    /// connection for the provider's whole latency, so a slow provider
    /// delays hits queued behind it for the pool.
    HeldTransaction,
}

/// The shared store: a Postgres table, filled under
/// `pg_advisory_xact_lock` and leases. See the [module documentation](super)
/// for the protocol and the table.
///
/// Cheap to clone (an `Arc` inside); clones share the pool and settings.
/// One store may serve many caches (providers): rows and locks are scoped by
/// namespace.
///
/// Use a store (and its pool) on one tokio runtime, the one that lives as
/// long as it: a pooled connection belongs to the runtime that opened it,
/// and one opened on a runtime that shuts down (a short-lived runtime of a
/// test, say) fails the statements later run on it. The store's listener
/// runs on the runtime that first needs it.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use loadlock::{FillMode, LockMode, PgStore};
///
/// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
/// let store = PgStore::builder(pool)
///     .table("cache.entries")
///     .lock_mode(LockMode::PerKey)
///     .fill_mode(FillMode::Lease)
///     .lock_timeout(Duration::from_secs(5))
///     .build()?;
/// store.migrate().await?; // at startup; safe when many instances start at once
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgStore {
    pub(super) inner: Arc<Inner>,
}

pub(super) struct Inner {
    pub(super) pool: PgPool,
    pub(super) table: TableName,
    pub(super) unlogged: bool,
    pub(super) lock_mode: LockMode,
    pub(super) fill_mode: FillMode,
    pub(super) lock_timeout: Duration,
    pub(super) idle_in_transaction_timeout: Duration,
    pub(super) max_locks_per_transaction: usize,
    pub(super) max_lease: Duration,
    pub(super) query_timeout: Duration,
    /// Whether statements are prepared once per connection (else each
    /// round trip runs unprepared, in a transaction of its own).
    pub(super) prepared: bool,
    /// Where the listener connects; `None`: no events.
    listener: Option<PgConnectOptions>,
    pub(super) sql: Statements,
    round_trips: AtomicU64,
    /// The lanes of the short statements, and the connections they keep
    /// (see `conn`).
    pub(super) lanes: Arc<Lanes>,
    /// Who holds the leases this store takes: shows in the table's
    /// `lease_holder` column.
    pub(super) holder: String,
    /// The channel of this table's events.
    pub(super) channel: String,
    /// Subscribers of the events; the listener starts with the first
    /// subscriber or the first fill that waits for another's lease.
    events: OnceLock<tokio::sync::broadcast::Sender<StoreEvent>>,
    /// Fills waiting for other holders' leases, woken by the listener.
    pub(super) waiters: Arc<Waiters>,
    /// Dropped with the store, which stops the listener.
    closing: tokio::sync::watch::Sender<()>,
    /// Optimistic reads of batches queueing together (see `combine`).
    pub(super) reads: Groups<ReadGroup, ReadRequest, ReadAnswer>,
    /// Claims of fills queueing together, by namespace.
    pub(super) claims: Groups<String, ClaimRequest, ClaimAnswer>,
    /// Publishes of fills queueing together.
    pub(super) publishes: Groups<PublishGroup, PublishRequest, Vec<Written>>,
    /// How long each namespace's fills lease keys for, so that a read can
    /// claim what it missed (see `preclaim`).
    pub(super) learned: Learned,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("PgStore")
            .field("table", &inner.table.to_string())
            .field("unlogged", &inner.unlogged)
            .field("lock_mode", &inner.lock_mode)
            .field("fill_mode", &inner.fill_mode)
            .field("lock_timeout", &inner.lock_timeout)
            .field("query_timeout", &inner.query_timeout)
            .field("max_lease", &inner.max_lease)
            .field(
                "idle_in_transaction_timeout",
                &inner.idle_in_transaction_timeout,
            )
            .field(
                "max_locks_per_transaction",
                &inner.max_locks_per_transaction,
            )
            .field("lanes", &inner.lanes.count())
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user:password@host:port/database`)
    /// with a pool of its own, and a store on it with every default; no
    /// `sqlx` needed in your manifest. Call [`migrate`](Self::migrate) next.
    ///
    /// The pool keeps at most [`CONNECT_POOL_SIZE`](super::CONNECT_POOL_SIZE)
    /// connections and waits at most
    /// [`CONNECT_ACQUIRE_TIMEOUT`](super::CONNECT_ACQUIRE_TIMEOUT) for one (a load then fails with
    /// [`Error::Store`] rather than waiting on). One connection is opened
    /// now, so a wrong URL or an unreachable server is an error here, not at
    /// the first load. For other settings (TLS, pool size, timeouts), build
    /// a pool with [`sqlx`](crate::sqlx) and hand it to [`new`](Self::new)
    /// or [`builder`](Self::builder). The store also opens one listener
    /// connection of its own for events.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `url` is not a Postgres URL; [`Error::Store`]
    /// when the server cannot be reached or refuses the connection.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let pool = super::connect_pool(url, super::CONNECT_POOL_SIZE).await?;
        Ok(PgStore::new(pool))
    }

    /// A store on `pool` with every default (see [`PgStoreBuilder`]).
    pub fn new(pool: PgPool) -> Self {
        PgStore::builder(pool)
            .build()
            .expect("the default settings are valid")
    }

    /// Starts configuring a store on `pool`.
    pub fn builder(pool: PgPool) -> PgStoreBuilder {
        PgStoreBuilder {
            pool,
            table: DEFAULT_TABLE.to_owned(),
            unlogged: false,
            lock_mode: LockMode::PerKey,
            fill_mode: FillMode::Lease,
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(120),
            max_locks_per_transaction: 1000,
            max_lease: Duration::from_secs(120),
            query_timeout: Duration::from_secs(30),
            prepared_statements: true,
            listener_url: None,
            lanes: DEFAULT_LANES,
        }
    }

    /// How many short statements this store runs at a time (see
    /// [`PgStoreBuilder::lanes`]).
    pub fn lanes(&self) -> NonZeroUsize {
        self.inner.lanes.count()
    }

    /// The table this store reads and writes.
    pub fn table(&self) -> &TableName {
        &self.inner.table
    }

    /// The pool this store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// The lock mode.
    pub fn lock_mode(&self) -> LockMode {
        self.inner.lock_mode
    }

    /// The fill protocol in use: [`LockMode::Namespace`] always fills with
    /// [`FillMode::HeldTransaction`].
    pub fn fill_mode(&self) -> FillMode {
        match self.inner.lock_mode {
            LockMode::Namespace => FillMode::HeldTransaction,
            LockMode::PerKey => self.inner.fill_mode,
        }
    }

    /// The `LISTEN/NOTIFY` channel of this table's events (invalidations,
    /// and publishes that other fills wait for). The listener connection
    /// shows in `pg_stat_activity` with the application name
    /// `loadlock-listener`.
    pub fn event_channel(&self) -> &str {
        &self.inner.channel
    }

    /// Statements this store has sent to the database so far, `BEGIN` and
    /// `COMMIT` included: each is one round trip.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Deletes at most `limit` rows that no longer serve (expired, or of a
    /// namespace generation older than the current one), skipping rows
    /// another transaction has locked or a live lease holds, so it never
    /// blocks a fill; returns how many it deleted. Call it periodically (for
    /// example every minute with a limit of 10,000) to keep the table small;
    /// a cache works without it, since such rows are misses and refills
    /// overwrite them.
    ///
    /// `expires_at` is deliberately not indexed (it changes on every refill,
    /// and an index would rule out HOT updates), so each call scans until it
    /// has found `limit` rows.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the statement fails or takes longer than the
    /// [query timeout](PgStoreBuilder::query_timeout).
    pub async fn purge_expired(&self, limit: usize) -> Result<u64, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.count_round_trips(1);
        let sql = &self.inner.sql.purge_expired;
        let done = on_conn!(self, "purging expired rows", Duration::ZERO, None, |conn| {
            sql.query().bind(limit).execute(conn)
        })?;
        Ok(done.rows_affected())
    }

    pub(super) fn count_round_trips(&self, n: u64) {
        self.inner.round_trips.fetch_add(n, Ordering::Relaxed);
    }

    /// A pooled connection outside the lanes (the one this batch's read
    /// handed on, if any), waiting until `deadline` at most.
    pub(super) async fn acquire(
        &self,
        doing: &str,
        deadline: tokio::time::Instant,
        limit: Duration,
    ) -> Result<Conn, Error> {
        self.acquire_conn(doing, deadline, limit, false).await
    }

    /// A pooled connection, waiting until `deadline` at most: the one this
    /// batch's read handed on, if any (it keeps its lane); else, with
    /// `lane`, one in a lane (see `conn`); else one of the pool.
    pub(super) async fn acquire_conn(
        &self,
        doing: &str,
        deadline: tokio::time::Instant,
        limit: Duration,
        lane: bool,
    ) -> Result<Conn, Error> {
        if let Some(conn) = crate::handoff::take(self.id()) {
            return Ok(conn);
        }
        let lane = if lane {
            match self.inner.lanes.enter(deadline).await {
                Entered::Lane(lane, Some(kept)) => return Ok(Conn::new(kept, Some(lane))),
                Entered::Lane(lane, None) => Some(lane),
                Entered::Past => None,
                Entered::TimedOut => return Err(self.timed_out(doing, limit)),
            }
        } else {
            None
        };
        // Never raced against anything but the deadline: a cancelled acquire
        // may drop a connection it was opening, and the pool opens another.
        match tokio::time::timeout_at(deadline, self.inner.pool.acquire()).await {
            Ok(Ok(conn)) => Ok(Conn::new(conn, lane)),
            Ok(Err(err)) => Err(self.error(doing, err)),
            Err(_) => Err(self.timed_out(doing, limit)),
        }
    }

    /// What a round trip leaves of its connection when it finished in time:
    /// back to its lane, if it has one and the statement succeeded, else to
    /// the pool (which, after a failure, settles whatever the statement
    /// left unfinished).
    pub(super) fn done_with<T>(&self, mut conn: Conn, result: &Result<T, Error>) {
        conn.finish(result.is_ok());
    }

    /// This store's identity, for connections it hands from a read to the
    /// fill that follows (see `handoff`).
    pub(super) fn id(&self) -> usize {
        Arc::as_ptr(&self.inner) as usize
    }

    pub(super) fn timed_out(&self, doing: &str, limit: Duration) -> Error {
        Error::Store {
            message: format!(
                "{doing} ({}): no answer within {limit:?}; the connection was discarded",
                self.inner.table
            )
            .into(),
            source: None,
        }
    }

    /// Maps a database error: a lock timeout to [`Error::LockTimeout`] when
    /// `locks` says what was being locked, otherwise as [`error`](Self::error).
    pub(super) fn db_error(
        &self,
        doing: &str,
        locks: Option<(&str, usize)>,
        err: sqlx::Error,
    ) -> Error {
        match locks {
            Some((namespace, keys)) if sql_state(&err).as_deref() == Some("55P03") => {
                Error::LockTimeout {
                    namespace: namespace.into(),
                    keys,
                    timeout: self.inner.lock_timeout,
                }
            }
            _ => self.error(doing, err),
        }
    }

    /// Maps a database error, naming the missing table when that is the
    /// cause.
    pub(super) fn error(&self, doing: &str, err: sqlx::Error) -> Error {
        match sql_state(&err).as_deref() {
            Some("42P01") | Some("42883") | Some("42703") => {
                return Error::store(
                    format!(
                        "{doing}: table {} is missing or not up to date; call PgStore::migrate() \
                         once at startup",
                        self.inner.table
                    ),
                    err,
                );
            }
            _ => {}
        }
        Error::store(format!("{doing} ({})", self.inner.table), err)
    }

    /// The event sender, starting the listener on first use; `None` outside
    /// a tokio runtime (nothing is set up then, so a later call may start
    /// it).
    pub(super) fn events(&self) -> Option<&tokio::sync::broadcast::Sender<StoreEvent>> {
        if let Some(sender) = self.inner.events.get() {
            return Some(sender);
        }
        let options = self.inner.listener.clone()?;
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        Some(self.inner.events.get_or_init(|| {
            let sender = tokio::sync::broadcast::channel(4096).0;
            events::spawn_listener(
                runtime,
                options,
                self.inner.channel.clone(),
                sender.clone(),
                Arc::clone(&self.inner.waiters),
                self.inner.closing.subscribe(),
            );
            sender
        }))
    }

    /// The most keys one claim or fill transaction covers for a fill whose
    /// provider calls carry `max_batch_size` keys: a whole number of calls
    /// where the lock cap allows.
    pub(super) fn group_size(&self, max_batch_size: usize) -> usize {
        let cap = self.inner.max_locks_per_transaction;
        if max_batch_size <= cap {
            cap / max_batch_size * max_batch_size
        } else {
            cap
        }
    }
}

#[async_trait::async_trait]
impl<F: BatchFetch> Store<F> for PgStore {
    /// Postgres `text` holds no NUL character: such a key fails alone.
    fn check_key(&self, key: &dyn fmt::Display) -> Result<(), String> {
        if crate::store::displays_char(key, '\0') {
            Err("it contains a NUL character, which Postgres text cannot hold".into())
        } else {
            Ok(())
        }
    }

    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        let displayed: Vec<String> = keys.iter().map(ToString::to_string).collect();
        self.read_optimistic(namespace, displayed, grace).await
    }

    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error> {
        let answers = match self.fill_mode() {
            FillMode::Lease => self.fill_leased(&fill, false).await?,
            FillMode::HeldTransaction => {
                // It may wait for rate-limit budget before its first
                // statement: nothing is held meanwhile.
                crate::handoff::clear();
                self.fill_held(&fill, false).await?
            }
        };
        answers.ok_or_else(|| Error::Store {
            message: "a fill gave up, which only a refresh may do".into(),
            source: None,
        })
    }

    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        match self.fill_mode() {
            FillMode::Lease => self.fill_leased(&fill, true).await,
            FillMode::HeldTransaction => self.fill_held(&fill, true).await,
        }
    }

    fn fill_time_limit(&self) -> Option<Duration> {
        Some(match self.fill_mode() {
            FillMode::Lease => super::lease::longest_covered_fetch(self.inner.max_lease),
            FillMode::HeldTransaction => self.inner.idle_in_transaction_timeout,
        })
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<StoreEvent>> {
        self.events().map(|sender| sender.subscribe())
    }

    async fn put_if_version(
        &self,
        namespace: &str,
        key: &F::Key,
        expected: u64,
        value: F::Value,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let text = key.to_string();
        let json = serde_json::to_string(&value)
            .map_err(|e| Error::store(format!("value of key {text:?} is not JSON"), e))?;
        self.put_if_version_text(namespace, text, expected, json, ttl)
            .await
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        self.invalidate_whole_namespace(namespace).await
    }

    async fn write_locked(
        &self,
        namespace: &str,
        keys: &[F::Key],
        work: futures::future::BoxFuture<'_, ()>,
    ) -> Result<(), Error> {
        let mut displayed: Vec<String> = keys.iter().map(ToString::to_string).collect();
        displayed.sort_unstable();
        displayed.dedup();
        if displayed.len() > self.inner.max_locks_per_transaction {
            return Err(Error::config(format!(
                "a write may hold at most max_locks_per_transaction ({}) keys",
                self.inner.max_locks_per_transaction
            )));
        }
        self.invalidate_group(namespace, &displayed, Some(work))
            .await
    }

    async fn invalidate(&self, namespace: &str, keys: &[F::Key]) -> Result<(), Error> {
        let mut displayed: Vec<String> = keys.iter().map(ToString::to_string).collect();
        // Sorted and deduplicated: one statement may not touch a row twice,
        // and concurrent invalidations take row locks in one order.
        displayed.sort_unstable();
        displayed.dedup();
        for group in displayed.chunks(self.inner.max_locks_per_transaction) {
            self.invalidate_group(namespace, group, None).await?;
        }
        Ok(())
    }
}

pub(super) fn sql_state(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

/// A duration as a Postgres setting value, in whole milliseconds (at least 1;
/// 0 would mean "no limit").
pub(super) fn pg_millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// Configures a [`PgStore`]; from [`PgStore::builder`].
///
/// | setting | default |
/// |---|---|
/// | [`table`](Self::table) | `loadlock_cache` |
/// | [`unlogged`](Self::unlogged) | `false` |
/// | [`lock_mode`](Self::lock_mode) | [`LockMode::PerKey`] |
/// | [`fill_mode`](Self::fill_mode) | [`FillMode::Lease`] |
/// | [`lock_timeout`](Self::lock_timeout) | 10 s |
/// | [`query_timeout`](Self::query_timeout) | 30 s |
/// | [`max_lease`](Self::max_lease) | 120 s |
/// | [`idle_in_transaction_timeout`](Self::idle_in_transaction_timeout) | 120 s |
/// | [`max_locks_per_transaction`](Self::max_locks_per_transaction) | 1,000 |
#[must_use = "a builder does nothing until .build() is called"]
pub struct PgStoreBuilder {
    pool: PgPool,
    table: String,
    unlogged: bool,
    lock_mode: LockMode,
    fill_mode: FillMode,
    lock_timeout: Duration,
    idle_in_transaction_timeout: Duration,
    max_locks_per_transaction: usize,
    max_lease: Duration,
    query_timeout: Duration,
    prepared_statements: bool,
    listener_url: Option<String>,
    lanes: NonZeroUsize,
}

impl fmt::Debug for PgStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStoreBuilder")
            .field("table", &self.table)
            .field("unlogged", &self.unlogged)
            .field("lock_mode", &self.lock_mode)
            .field("fill_mode", &self.fill_mode)
            .field("lock_timeout", &self.lock_timeout)
            .field("query_timeout", &self.query_timeout)
            .field("max_lease", &self.max_lease)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("max_locks_per_transaction", &self.max_locks_per_transaction)
            .field("prepared_statements", &self.prepared_statements)
            .field("listener_url", &self.listener_url.is_some())
            .field("lanes", &self.lanes)
            .finish_non_exhaustive()
    }
}

impl PgStoreBuilder {
    /// Whether statements are prepared once per connection (the default),
    /// or sent unprepared. Turn it off behind a pooler that does not keep
    /// prepared statements per client: PgBouncer in transaction mode before
    /// version 1.21 (or with `max_prepared_statements = 0`). Each round
    /// trip of the store then runs unprepared (sqlx's unnamed statements)
    /// in a transaction of its own, so that the pooler keeps one server
    /// connection for it: two more round trips each (`BEGIN`, `COMMIT`),
    /// and a parse and plan on every call. PgBouncer 1.21 or later with
    /// `max_prepared_statements` above zero needs none of this.
    ///
    /// Events (`LISTEN`) do not survive transaction pooling: give the
    /// store a direct connection for them with
    /// [`listener_url`](Self::listener_url). Without one, a store whose
    /// statements are unprepared publishes no events:
    /// [`Cache::invalidations`](crate::Cache::invalidations) stays empty, a
    /// [local tier](crate::CacheBuilder::local_tier) is refused at build
    /// (it could not be evicted), and a fill waiting for another
    /// instance's lease looks again on a poll (50 ms, doubling to 1 s)
    /// instead of being woken.
    pub fn prepared_statements(mut self, prepared: bool) -> Self {
        self.prepared_statements = prepared;
        self
    }

    /// Where the listener of events connects (`postgres://…`), when the
    /// pool goes through a transaction pooler (see
    /// [`prepared_statements`](Self::prepared_statements)): a direct
    /// connection to the server, or a PgBouncer database in session mode.
    /// By default the listener connects as the pool does. Checked by
    /// [`build`](Self::build).
    pub fn listener_url(mut self, url: impl Into<String>) -> Self {
        self.listener_url = Some(url.into());
        self
    }

    /// The table, `table` or `schema.table` (see [`TableName`]); validated by
    /// [`build`](Self::build).
    pub fn table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// Whether [`PgStore::migrate`] creates the table `UNLOGGED`.
    ///
    /// An unlogged table skips the write-ahead log: fills write faster and
    /// put no load on WAL archiving, but the table is **emptied after a
    /// crash** of the database server and is **not replicated** to standbys
    /// (a failover starts with an empty cache). For a cache, both only cost
    /// refetches. Applies when the table is created; an existing table is
    /// left as it is (`ALTER TABLE … SET UNLOGGED` changes it).
    pub fn unlogged(mut self, unlogged: bool) -> Self {
        self.unlogged = unlogged;
        self
    }

    /// How fills lock their keys; see [`LockMode`].
    pub fn lock_mode(mut self, mode: LockMode) -> Self {
        self.lock_mode = mode;
        self
    }

    /// How a fill keeps its keys while it calls the provider; see
    /// [`FillMode`]. Use one mode for every instance sharing a table: mixing
    /// them never serves a stale value, but a held-transaction fill
    /// overwrites (revokes) a lease, so a key may then be fetched twice.
    pub fn fill_mode(mut self, mode: FillMode) -> Self {
        self.fill_mode = mode;
        self
    }

    /// How long one statement that takes locks (a claim, an invalidation)
    /// may wait for them in all, before failing with
    /// [`Error::LockTimeout`]: the bound holds for the statement as a
    /// whole, however many keys it locks. At least 1 ms.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The longest any one round trip may take, waiting for a pooled
    /// connection included (plus the lock timeout, for statements that take
    /// locks). Past it the operation fails with [`Error::Store`] and the
    /// connection is discarded, so a half-open connection or a stalled
    /// server fails loads instead of hanging them. At least 1 ms.
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// The longest lease a fill may take ([`FillMode::Lease`]). A fill's
    /// lease lasts as long as its provider calls may take (every chunk of
    /// its group, every attempt at the provider timeout, every retry wait),
    /// plus a margin; large fills are split into groups whose lease fits.
    /// A lease past its expiry may be taken over by another fill: its holder
    /// is presumed dead or hung. [`CacheBuilder::build`](crate::CacheBuilder::build)
    /// checks that one provider call with its retries fits. At least 1 s.
    pub fn max_lease(mut self, max: Duration) -> Self {
        self.max_lease = max;
        self
    }

    /// How long a transaction may sit idle: with
    /// [`FillMode::HeldTransaction`], how long the provider (with its
    /// retries) may take while the keys' locks are held; with leases, it
    /// only bounds short transactions (and [`Cache::write`](crate::Cache::write)'s
    /// update). Past it, the server ends the session: the locks are released
    /// and the operation fails with [`Error::Store`], so nothing can hold
    /// keys forever. At least 1 ms.
    pub fn idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// How many of the protocol's short statements — optimistic reads and
    /// re-reads, claims that only try locks, publishes, releases — this
    /// store runs at a time, each on a connection of the pool (default
    /// [`DEFAULT_LANES`], one). The ones beyond wait in the process, and
    /// those that wait together go as one statement when a lane frees up
    /// (see the [module docs](super)): a busy server runs fewer, larger
    /// statements on fewer sessions, which lowers latency when the
    /// database's cores are the bottleneck — with eight instances on a
    /// two-core server, one lane each cut the median request of the
    /// README's main job (its open scenario) by 40% and its p99 by half
    /// against eight lanes each.
    ///
    /// A statement in a lane never waits for an advisory lock or a
    /// provider, so a lane is never held for long; should one get stuck
    /// (its publish waiting for a row lock an outside transaction holds, a
    /// half-open connection), a statement that waited a second for a lane
    /// runs past the lanes on a connection of the pool. Statements that may
    /// wait (a claim waiting for a busy lock, lease renewals,
    /// invalidations, writes, held-transaction fills, purges) take no lane
    /// and are bounded by the pool alone. Raise it for a database far away
    /// (each statement then spends most of its time on the network) or with
    /// cores to spare for few instances.
    pub fn lanes(mut self, lanes: NonZeroUsize) -> Self {
        self.lanes = lanes;
        self
    }

    /// The most keys one claim or fill transaction locks; larger miss sets
    /// are filled in several groups, one after another, and claims of
    /// several fills that go as one statement (those that queue together,
    /// and the claim a read makes for the batches it answers) stay within
    /// it too. The server's lock table is shared and finite (default
    /// settings fail near 10–20 thousand locks in one transaction). At
    /// least 1.
    pub fn max_locks_per_transaction(mut self, max: usize) -> Self {
        self.max_locks_per_transaction = max;
        self
    }

    /// Builds the store. It does not touch the database: call
    /// [`PgStore::migrate`] at startup.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid table name, a zero timeout, a lease
    /// limit under a second, or a zero lock cap.
    pub fn build(self) -> Result<PgStore, Error> {
        let table = TableName::parse(&self.table)?;
        // Postgres takes these settings as 32-bit milliseconds.
        let pg_range = Duration::from_millis(1)..=Duration::from_millis(i32::MAX as u64);
        for (name, value) in [
            ("lock_timeout", self.lock_timeout),
            (
                "idle_in_transaction_timeout",
                self.idle_in_transaction_timeout,
            ),
            ("query_timeout", self.query_timeout),
            ("max_lease", self.max_lease),
        ] {
            if !pg_range.contains(&value) {
                return Err(Error::config(format!(
                    "{name} must be between 1 ms and 2^31 - 1 ms (about 24 days)"
                )));
            }
        }
        if self.max_lease < Duration::from_secs(1) {
            return Err(Error::config("max_lease must be at least 1 s"));
        }
        if self.max_locks_per_transaction == 0 {
            return Err(Error::config(
                "max_locks_per_transaction must be at least 1",
            ));
        }
        let listener =
            match &self.listener_url {
                Some(url) => Some(url.parse::<PgConnectOptions>().map_err(|e| {
                    Error::config(format!("listener_url is not a Postgres URL: {e}"))
                })?),
                None if self.prepared_statements => Some((*self.pool.connect_options()).clone()),
                None => None,
            };
        let sql = Statements::new(&table, self.prepared_statements);
        let channel = events::channel(&table);
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                table,
                unlogged: self.unlogged,
                lock_mode: self.lock_mode,
                fill_mode: self.fill_mode,
                lock_timeout: self.lock_timeout,
                idle_in_transaction_timeout: self.idle_in_transaction_timeout,
                max_locks_per_transaction: self.max_locks_per_transaction,
                max_lease: self.max_lease,
                query_timeout: self.query_timeout,
                prepared: self.prepared_statements,
                listener,
                holder: holder_name(),
                channel,
                sql,
                round_trips: AtomicU64::new(0),
                lanes: Lanes::new(self.lanes),
                events: OnceLock::new(),
                waiters: Arc::new(Waiters::default()),
                closing: tokio::sync::watch::channel(()).0,
                // Reads and publishes take no advisory lock: a group of them
                // is as large as what queues. A combined claim locks every
                // key of its group in one transaction, within the cap.
                reads: Groups::new(usize::MAX),
                claims: Groups::new(self.max_locks_per_transaction),
                publishes: Groups::new(usize::MAX),
                learned: Learned::default(),
            }),
        })
    }
}

/// The name this store's leases carry: the process and a per-store number,
/// so operators can tell holders apart in the table.
fn holder_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "pid {} store {}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}
