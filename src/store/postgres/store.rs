//! [`PgStore`] and its builder: the protocol of the shared tier.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use sqlx::postgres::{PgPool, PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{Executor, Row};

use super::sql::Statements;
use super::table::TableName;
use crate::store::{lock_id, namespace_lock_id, Fill, Filled, Lookup, Store};
use crate::{BatchFetch, Entry, Error};

/// The default table: `loadlock_cache`, in the connection's search path.
const DEFAULT_TABLE: &str = "loadlock_cache";

/// How a fill locks what it fills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LockMode {
    /// One advisory lock per key (the default): fills of disjoint keys run
    /// concurrently, fills of the same key are serialized.
    #[default]
    PerKey,
    /// One advisory lock per namespace: at most one fill of the namespace
    /// runs at a time across the fleet ("serial batches"), for providers
    /// that forbid concurrent calls. Exactly-once holds the same way.
    Namespace,
}

/// The shared store: a Postgres table, filled under
/// `pg_advisory_xact_lock`. See the [module documentation](super) for the
/// protocol and the table.
///
/// Cheap to clone (an `Arc` inside); clones share the pool and settings.
/// One store may serve many caches (providers): rows and locks are scoped by
/// namespace.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use loadlock::{LockMode, PgStore};
///
/// let pool = sqlx::PgPool::connect("postgres://localhost/app").await?;
/// let store = PgStore::builder(pool)
///     .table("cache.entries")
///     .lock_mode(LockMode::PerKey)
///     .lock_timeout(Duration::from_secs(5))
///     .build()?;
/// store.migrate().await?; // at startup; safe when many instances start at once
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgStore {
    pub(super) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(super) pool: PgPool,
    pub(super) table: TableName,
    pub(super) unlogged: bool,
    lock_mode: LockMode,
    lock_timeout: Duration,
    idle_in_transaction_timeout: Duration,
    max_locks_per_transaction: usize,
    sql: Statements,
    round_trips: AtomicU64,
    /// The channel of this table's invalidation events.
    channel: String,
    /// Subscribers of the events; the listener starts with the first.
    events: std::sync::OnceLock<tokio::sync::broadcast::Sender<crate::StoreEvent>>,
    /// Dropped with the store, which stops the listener.
    closing: tokio::sync::watch::Sender<()>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &self.inner;
        f.debug_struct("PgStore")
            .field("table", &inner.table.to_string())
            .field("unlogged", &inner.unlogged)
            .field("lock_mode", &inner.lock_mode)
            .field("lock_timeout", &inner.lock_timeout)
            .field(
                "idle_in_transaction_timeout",
                &inner.idle_in_transaction_timeout,
            )
            .field(
                "max_locks_per_transaction",
                &inner.max_locks_per_transaction,
            )
            .finish_non_exhaustive()
    }
}

impl PgStore {
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
            lock_timeout: Duration::from_secs(10),
            idle_in_transaction_timeout: Duration::from_secs(120),
            max_locks_per_transaction: 1000,
        }
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

    /// The `LISTEN/NOTIFY` channel of this table's invalidation events. The
    /// listener connection shows in `pg_stat_activity` with the application
    /// name `loadlock-listener`.
    pub fn event_channel(&self) -> &str {
        &self.inner.channel
    }

    /// Statements this store has sent to the database so far, `BEGIN` and
    /// `COMMIT` included: each is one round trip.
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// Deletes at most `limit` expired rows (of every namespace), skipping
    /// rows another transaction has locked, so it never blocks a fill; returns
    /// how many it deleted. Call it periodically (for example every minute
    /// with a limit of 10,000) to keep the table small; a cache works without
    /// it, since expired rows are misses and refills overwrite them.
    ///
    /// `expires_at` is deliberately not indexed (it changes on every refill,
    /// and an index would rule out HOT updates), so each call scans until it
    /// has found `limit` expired rows.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the statement fails.
    pub async fn purge_expired(&self, limit: usize) -> Result<u64, Error> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.count_round_trips(1);
        let done = sqlx::query(&self.inner.sql.purge_expired)
            .bind(limit)
            .execute(&self.inner.pool)
            .await
            .map_err(|e| self.error("purging expired rows", e))?;
        Ok(done.rows_affected())
    }

    pub(super) fn count_round_trips(&self, n: u64) {
        self.inner.round_trips.fetch_add(n, Ordering::Relaxed);
    }

    /// Maps a database error, naming the missing table when that is the
    /// cause.
    pub(super) fn error(&self, doing: &str, err: sqlx::Error) -> Error {
        if sql_state(&err).as_deref() == Some("42P01") {
            return Error::store(
                format!(
                    "{doing}: table {} does not exist; call PgStore::migrate() once at startup",
                    self.inner.table
                ),
                err,
            );
        }
        Error::store(format!("{doing} ({})", self.inner.table), err)
    }

    async fn select_fresh<'c, E, V>(
        &self,
        executor: E,
        namespace: &str,
        keys: &[String],
        grace: Duration,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        E: Executor<'c, Database = Postgres>,
        V: serde::de::DeserializeOwned + Clone,
    {
        self.count_round_trips(1);
        let rows = sqlx::query(&self.inner.sql.select_fresh)
            .bind(namespace)
            .bind(keys)
            .bind(grace.as_secs_f64())
            .fetch_all(executor)
            .await
            .map_err(|e| self.error("reading cache rows", e))?;
        let position: HashMap<&str, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| (key.as_str(), i))
            .collect();
        let mut found = vec![Lookup::Miss; keys.len()];
        for row in rows {
            let Some(&i) = row
                .try_get::<&str, _>(0)
                .ok()
                .and_then(|key| position.get(key))
            else {
                continue;
            };
            found[i] = decode_value(&row, namespace, &keys[i]);
        }
        Ok(found)
    }

    /// Opens a bounded READ COMMITTED transaction holding the locks of
    /// `keys` (or of the namespace), in one ordered statement. Dropping the
    /// transaction before COMMIT rolls back, which releases the locks and
    /// writes nothing.
    async fn begin_locked(
        &self,
        namespace: &str,
        keys: &[String],
        try_only: bool,
    ) -> Result<Option<sqlx::Transaction<'static, Postgres>>, Error> {
        self.begin_with_locks(namespace, self.locks_for(keys), try_only)
            .await
    }

    /// What this store's lock mode locks for `keys`.
    fn locks_for<'k>(&self, keys: &'k [String]) -> Locks<'k> {
        match self.inner.lock_mode {
            LockMode::PerKey => Locks::Keys(keys),
            LockMode::Namespace => Locks::Namespace,
        }
    }

    /// [`begin_locked`](Self::begin_locked) for an explicit set of locks.
    async fn begin_with_locks(
        &self,
        namespace: &str,
        locks: Locks<'_>,
        try_only: bool,
    ) -> Result<Option<sqlx::Transaction<'static, Postgres>>, Error> {
        let inner = &*self.inner;
        let namespace_id = namespace_lock_id(namespace);
        let (keys, ids): (usize, Vec<i64>) = match locks {
            Locks::Keys(keys) => (
                keys.len(),
                keys.iter().map(|key| lock_id(namespace, key)).collect(),
            ),
            Locks::Namespace => (0, Vec::new()),
        };
        let whole_namespace = matches!(locks, Locks::Namespace);
        self.count_round_trips(1);
        let mut tx = inner
            .pool
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(|e| self.error("starting a transaction", e))?;
        self.count_round_trips(1);
        sqlx::query(inner.sql.bound_transaction)
            .bind(pg_millis(inner.lock_timeout))
            .bind(pg_millis(inner.idle_in_transaction_timeout))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("bounding the transaction", e))?;
        self.count_round_trips(1);
        if try_only {
            let taken: bool = if whole_namespace {
                sqlx::query_scalar(inner.sql.try_lock_namespace)
                    .bind(namespace_id)
                    .fetch_one(&mut *tx)
                    .await
            } else {
                sqlx::query_scalar(inner.sql.try_lock)
                    .bind(&ids)
                    .bind(namespace_id)
                    .fetch_one(&mut *tx)
                    .await
            }
            .map_err(|e| self.error("trying the keys' locks", e))?;
            // Dropping `tx` rolls back, releasing whatever was taken.
            return Ok(taken.then_some(tx));
        }
        let locked = if whole_namespace {
            sqlx::query(inner.sql.lock_namespace)
                .bind(namespace_id)
                .execute(&mut *tx)
                .await
        } else {
            sqlx::query(inner.sql.lock)
                .bind(&ids)
                .bind(namespace_id)
                .execute(&mut *tx)
                .await
        };
        match locked {
            Ok(_) => Ok(Some(tx)),
            Err(err) if sql_state(&err).as_deref() == Some("55P03") => Err(Error::LockTimeout {
                namespace: namespace.into(),
                keys,
                timeout: inner.lock_timeout,
            }),
            Err(err) => Err(self.error("taking the keys' locks", err)),
        }
    }

    /// [`begin_with_locks`](Self::begin_with_locks), waiting for the locks.
    async fn lock(
        &self,
        namespace: &str,
        locks: Locks<'_>,
    ) -> Result<sqlx::Transaction<'static, Postgres>, Error> {
        self.begin_with_locks(namespace, locks, false)
            .await?
            .ok_or_else(|| Error::Store {
                message: "the locks were not taken".into(),
                source: None,
            })
    }

    /// Tombstones `keys` (entries that are never fresh, so never served,
    /// stale or not) and announces them, inside `tx`.
    async fn tombstone(
        &self,
        tx: &mut sqlx::PgConnection,
        namespace: &str,
        keys: &[String],
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        sqlx::query(&self.inner.sql.tombstone)
            .bind(namespace)
            .bind(keys)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("invalidating cache rows", e))?;
        self.publish(tx, namespace, Some(keys)).await
    }

    /// Announces `keys` of `namespace` (all of it for `None`) inside `tx`:
    /// delivered when, and only if, it commits.
    async fn publish(
        &self,
        tx: &mut sqlx::PgConnection,
        namespace: &str,
        keys: Option<&[String]>,
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .bind(&self.inner.channel)
            .bind(super::events::payloads(namespace, keys))
            .execute(tx)
            .await
            .map_err(|e| self.error("publishing an invalidation", e))?;
        Ok(())
    }

    async fn commit(
        &self,
        tx: sqlx::Transaction<'static, Postgres>,
        doing: &str,
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        tx.commit().await.map_err(|e| self.error(doing, e))
    }

    /// One invalidation transaction: the keys' locks, `work` (a write to
    /// the source) if any, then their tombstones.
    async fn invalidate_group(
        &self,
        namespace: &str,
        keys: &[String],
        work: Option<futures::future::BoxFuture<'_, ()>>,
    ) -> Result<(), Error> {
        let mut tx = self.lock(namespace, self.locks_for(keys)).await?;
        if let Some(work) = work {
            work.await;
        }
        self.tombstone(&mut tx, namespace, keys).await?;
        self.commit(tx, "committing an invalidation").await
    }

    /// One fill transaction over `group` (indices into `fill.keys()`).
    async fn fill_group<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        displayed: &[String],
        group: &[usize],
        answers: &mut [Option<Filled<F::Value>>],
        try_only: bool,
    ) -> Result<bool, Error> {
        let inner = &*self.inner;
        let namespace = fill.namespace();
        let keys: Vec<String> = group.iter().map(|&i| displayed[i].clone()).collect();
        let started = Instant::now();
        let locked = self.begin_locked(namespace, &keys, try_only).await;
        fill.record_lock_wait(started.elapsed());
        let Some(mut tx) = locked? else {
            return Ok(false);
        };

        // A new statement, so a new snapshot: it sees what others committed
        // while we waited for the locks.
        let reread: Vec<Lookup<F::Value>> = self
            .select_fresh(&mut *tx, namespace, &keys, Duration::ZERO)
            .await?;
        let mut missing = Vec::new();
        for (&i, lookup) in group.iter().zip(reread) {
            match lookup {
                Lookup::Hit(value) => answers[i] = Some(Filled::Stored(Some(value))),
                Lookup::NegativeHit => answers[i] = Some(Filled::Stored(None)),
                _ => missing.push(i),
            }
        }
        if missing.is_empty() {
            fill.about_to_commit(group);
            self.commit(tx, "ending a fill transaction").await?;
            return Ok(true);
        }

        let missing_keys: Vec<F::Key> = missing.iter().map(|&i| fill.keys()[i].clone()).collect();
        let mut fetched = fill.fetch(&missing_keys).await?;

        let mut rows: Vec<(&str, Option<String>)> = Vec::with_capacity(missing.len());
        let mut values: HashMap<&str, (usize, F::Value)> = HashMap::with_capacity(missing.len());
        for (&i, key) in missing.iter().zip(&missing_keys) {
            let value = fetched.remove(key);
            let json = match &value {
                Some(value) => Some(serde_json::to_string(value).map_err(|e| {
                    Error::store(format!("value of key {:?} is not JSON", displayed[i]), e)
                })?),
                None => None,
            };
            rows.push((displayed[i].as_str(), json));
            answers[i] = Some(Filled::Fetched(None));
            if let Some(value) = value {
                values.insert(displayed[i].as_str(), (i, value));
            }
        }
        // Sorted (so concurrent upserts take row locks in one order) and
        // deduplicated (one statement may not touch a row twice).
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        let (row_keys, row_values): (Vec<&str>, Vec<Option<String>>) = rows.into_iter().unzip();
        self.count_round_trips(1);
        let written = sqlx::query(&inner.sql.upsert)
            .bind(namespace)
            .bind(&row_keys)
            .bind(&row_values)
            .bind(fill.ttl().as_secs_f64())
            .bind(fill.negative_ttl().as_secs_f64())
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| self.error("writing cache rows", e))?;
        // The version and times each value was written with.
        for row in written {
            let Ok(key) = row.try_get::<&str, _>(0) else {
                continue;
            };
            if let Some((i, value)) = values.remove(key) {
                let (version, fetched_at, expires_at) = row_meta(&row, 1);
                answers[i] = Some(Filled::Fetched(Some(Entry::new(
                    value, version, fetched_at, expires_at,
                ))));
            }
        }
        fill.about_to_commit(group);
        self.commit(tx, "committing a fill").await?;
        Ok(true)
    }
}

#[async_trait::async_trait]
impl<F: BatchFetch> Store<F> for PgStore {
    async fn get(
        &self,
        namespace: &str,
        keys: &[F::Key],
        grace: Duration,
    ) -> Result<Vec<Lookup<F::Value>>, Error> {
        let displayed: Vec<String> = keys.iter().map(ToString::to_string).collect();
        self.select_fresh(&self.inner.pool, namespace, &displayed, grace)
            .await
    }

    async fn refresh(&self, fill: Fill<'_, F>) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let displayed: Vec<String> = fill.keys().iter().map(ToString::to_string).collect();
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..displayed.len()).map(|_| None).collect();
        let all: Vec<usize> = (0..displayed.len()).collect();
        // A refresh is small (the stale keys of one batch): one group.
        if !self
            .fill_group(&fill, &displayed, &all, &mut answers, true)
            .await?
        {
            return Ok(None);
        }
        Ok(answers.into_iter().collect())
    }

    fn fill_time_limit(&self) -> Option<Duration> {
        Some(self.inner.idle_in_transaction_timeout)
    }

    fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<crate::StoreEvent>> {
        if let Some(sender) = self.inner.events.get() {
            return Some(sender.subscribe());
        }
        // The listener runs on the tokio runtime; without one there are no
        // events (and nothing is set up, so a later call may start them).
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let sender = self.inner.events.get_or_init(|| {
            let sender = tokio::sync::broadcast::channel(4096).0;
            super::events::spawn_listener(
                runtime,
                Arc::downgrade(&self.inner),
                self.inner.channel.clone(),
                sender.clone(),
                self.inner.closing.subscribe(),
            );
            sender
        });
        Some(sender.subscribe())
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
        let expected_i64 = i64::try_from(expected).unwrap_or(i64::MAX);
        let keys = std::slice::from_ref(&text);
        let mut tx = self.lock(namespace, self.locks_for(keys)).await?;
        self.count_round_trips(1);
        let written: Option<i64> = sqlx::query_scalar(&self.inner.sql.put_if_version)
            .bind(namespace)
            .bind(&text)
            .bind(expected_i64)
            .bind(&json)
            .bind(ttl.as_secs_f64())
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| self.error("putting a value", e))?;
        let Some(version) = written else {
            self.count_round_trips(1);
            let actual: Option<i64> = sqlx::query_scalar(&self.inner.sql.version_of)
                .bind(namespace)
                .bind(&text)
                .fetch_optional(&mut *tx)
                .await
                .map_err(|e| self.error("reading a version", e))?;
            return Err(Error::VersionMismatch {
                namespace: namespace.into(),
                key: text.into(),
                expected,
                actual: actual.and_then(|v| u64::try_from(v).ok()),
            });
        };
        self.publish(&mut tx, namespace, Some(keys)).await?;
        self.commit(tx, "committing a put").await?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    async fn invalidate_namespace(&self, namespace: &str) -> Result<(), Error> {
        let mut tx = self.lock(namespace, Locks::Namespace).await?;
        // Deleting keeps versions growing: they come from a sequence.
        self.count_round_trips(1);
        sqlx::query(&self.inner.sql.delete_namespace)
            .bind(namespace)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("invalidating a namespace", e))?;
        self.publish(&mut tx, namespace, None).await?;
        self.commit(tx, "committing an invalidation").await
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

    async fn fill(&self, fill: Fill<'_, F>) -> Result<Vec<Filled<F::Value>>, Error> {
        let displayed: Vec<String> = fill.keys().iter().map(ToString::to_string).collect();
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..displayed.len()).map(|_| None).collect();
        let indices: Vec<usize> = (0..displayed.len()).collect();
        let group_size = match self.inner.lock_mode {
            // A whole number of provider calls per group where the cap
            // allows, so groups add no provider call.
            LockMode::PerKey => {
                let cap = self.inner.max_locks_per_transaction;
                let batch = fill.max_batch_size();
                if batch <= cap {
                    cap / batch * batch
                } else {
                    cap
                }
            }
            LockMode::Namespace => indices.len().max(1),
        };
        // Groups run one after another: a transaction never waits for a lock
        // while holding another group's locks. Each group commits on its own:
        // when a later group's provider call fails, earlier groups' values
        // stay stored (they are good values), and the load still fails.
        for group in indices.chunks(group_size) {
            self.fill_group(&fill, &displayed, group, &mut answers, false)
                .await?;
        }
        answers
            .into_iter()
            .map(|answer| {
                answer.ok_or_else(|| Error::Store {
                    message: "a fill left a key unanswered".into(),
                    source: None,
                })
            })
            .collect()
    }
}

/// Decodes a row's value: a hit, a negative entry (NULL), or undecodable.
fn decode_value<V: serde::de::DeserializeOwned>(
    row: &PgRow,
    namespace: &str,
    key: &str,
) -> Lookup<V> {
    let fresh = row.try_get::<bool, _>(2).unwrap_or(false);
    match row.try_get::<Option<Json<V>>, _>(1) {
        Ok(Some(Json(value))) => {
            let (version, fetched_at, expires_at) = row_meta(row, 3);
            let entry = Entry::new(value, version, fetched_at, expires_at);
            if fresh {
                Lookup::Hit(entry)
            } else {
                Lookup::Stale(entry)
            }
        }
        Ok(None) if fresh => Lookup::NegativeHit,
        Ok(None) => Lookup::Miss,
        Err(err) => {
            tracing::warn!(
                namespace,
                key,
                error = %err,
                "cached row does not decode into the value type; fetching it again"
            );
            Lookup::Undecodable
        }
    }
}

/// Reads `version, fetched_at, expires_at` (the times as epoch seconds)
/// from the columns starting at `first`.
fn row_meta(row: &PgRow, first: usize) -> (u64, SystemTime, SystemTime) {
    let version = row.try_get::<i64, _>(first).unwrap_or(0);
    let time = |i: usize| {
        let seconds = row.try_get::<f64, _>(i).unwrap_or(0.0);
        Duration::try_from_secs_f64(seconds)
            .map(|d| SystemTime::UNIX_EPOCH + d)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    (
        u64::try_from(version).unwrap_or(0),
        time(first + 1),
        time(first + 2),
    )
}

fn sql_state(err: &sqlx::Error) -> Option<String> {
    err.as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

/// A duration as a Postgres setting value, in whole milliseconds (at least 1;
/// 0 would mean "no limit").
fn pg_millis(duration: Duration) -> String {
    format!("{}ms", duration.as_millis().max(1))
}

/// Configures a [`PgStore`]; from [`PgStore::builder`].
///
/// | setting | default |
/// |---|---|
/// | [`table`](Self::table) | `loadlock_cache` |
/// | [`unlogged`](Self::unlogged) | `false` |
/// | [`lock_mode`](Self::lock_mode) | [`LockMode::PerKey`] |
/// | [`lock_timeout`](Self::lock_timeout) | 10 s |
/// | [`idle_in_transaction_timeout`](Self::idle_in_transaction_timeout) | 120 s |
/// | [`max_locks_per_transaction`](Self::max_locks_per_transaction) | 1,000 |
#[must_use = "a builder does nothing until .build() is called"]
pub struct PgStoreBuilder {
    pool: PgPool,
    table: String,
    unlogged: bool,
    lock_mode: LockMode,
    lock_timeout: Duration,
    idle_in_transaction_timeout: Duration,
    max_locks_per_transaction: usize,
}

impl fmt::Debug for PgStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStoreBuilder")
            .field("table", &self.table)
            .field("unlogged", &self.unlogged)
            .field("lock_mode", &self.lock_mode)
            .field("lock_timeout", &self.lock_timeout)
            .field(
                "idle_in_transaction_timeout",
                &self.idle_in_transaction_timeout,
            )
            .field("max_locks_per_transaction", &self.max_locks_per_transaction)
            .finish_non_exhaustive()
    }
}

impl PgStoreBuilder {
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

    /// How long a fill waits for its keys' locks before failing with
    /// [`Error::LockTimeout`]. At least 1 ms.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How long a fill transaction may sit idle, which is how long the
    /// provider (with its retries) may take while the keys' locks are held.
    /// Past it, the server ends the session: the locks are released and the
    /// load fails with [`Error::Store`], so nothing can hold keys forever.
    /// The cache's provider timeout, times its attempts, plus retry waits,
    /// must be shorter ([`CacheBuilder::build`](crate::CacheBuilder::build)
    /// checks). At least 1 ms.
    pub fn idle_in_transaction_timeout(mut self, timeout: Duration) -> Self {
        self.idle_in_transaction_timeout = timeout;
        self
    }

    /// The most keys one fill transaction locks; larger miss sets are filled
    /// in several transactions, one after another. The server's lock table is
    /// shared and finite (default settings fail near 10–20 thousand locks in
    /// one transaction). At least 1.
    pub fn max_locks_per_transaction(mut self, max: usize) -> Self {
        self.max_locks_per_transaction = max;
        self
    }

    /// Builds the store. It does not touch the database: call
    /// [`PgStore::migrate`] at startup.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid table name, a zero timeout or a zero
    /// lock cap.
    pub fn build(self) -> Result<PgStore, Error> {
        let table = TableName::parse(&self.table)?;
        // Postgres takes these settings as 32-bit milliseconds.
        let pg_range = Duration::from_millis(1)..=Duration::from_millis(i32::MAX as u64);
        if !pg_range.contains(&self.lock_timeout) {
            return Err(Error::config(
                "lock_timeout must be between 1 ms and 2^31 - 1 ms (about 24 days)",
            ));
        }
        if !pg_range.contains(&self.idle_in_transaction_timeout) {
            return Err(Error::config(
                "idle_in_transaction_timeout must be between 1 ms and 2^31 - 1 ms (about 24 days)",
            ));
        }
        if self.max_locks_per_transaction == 0 {
            return Err(Error::config(
                "max_locks_per_transaction must be at least 1",
            ));
        }
        let sql = Statements::new(&table);
        let channel = super::events::channel(&table);
        Ok(PgStore {
            inner: Arc::new(Inner {
                pool: self.pool,
                table,
                unlogged: self.unlogged,
                lock_mode: self.lock_mode,
                lock_timeout: self.lock_timeout,
                idle_in_transaction_timeout: self.idle_in_transaction_timeout,
                max_locks_per_transaction: self.max_locks_per_transaction,
                channel,
                sql,
                round_trips: AtomicU64::new(0),
                events: std::sync::OnceLock::new(),
                closing: tokio::sync::watch::channel(()).0,
            }),
        })
    }
}

/// What a transaction locks.
#[derive(Clone, Copy)]
enum Locks<'a> {
    /// These keys (and their namespace, shared).
    Keys(&'a [String]),
    /// The whole namespace, exclusively.
    Namespace,
}
