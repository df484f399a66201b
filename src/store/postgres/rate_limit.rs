//! [`PgRateLimit`]: one provider budget for a whole fleet, kept in Postgres.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgPool;

use super::table::{Sql, TableName};
use crate::limit::{FleetLimiter, FleetTurn};
use crate::{Error, Quota};

/// A provider budget shared by every instance: one GCRA state row per
/// provider namespace, charged atomically per provider call with the
/// database clock (`clock_timestamp()`), so N instances together stay within
/// one [`Quota`]. When the provider tells any instance to back off (429 with
/// `Retry-After`), that instance records `blocked_until` in the row, and
/// every instance pauses until then.
///
/// A call that finds the budget spent reserves the next free turn in the
/// same statement and waits for it: turns go to calls in the order they
/// asked, whichever instance they run on, and each call is charged with one
/// round trip however long it waits (plus one read when its turn comes, to
/// honour a pause recorded meanwhile; a call shared by the fleet reads it
/// 3 ms before its turn, then closes, and starts no earlier than its
/// turn). A call whose wait is cancelled, or
/// that a pause holds past its turn, leaves that turn unused: the budget
/// then lets fewer calls through, never more.
///
/// Give it a pool of its own (two connections are plenty): it is charged
/// while fills hold connections of the store's pool, and must not wait for
/// one of them.
///
/// The table (default `loadlock_rate_limit`) and its functions are
/// created by [`migrate`](PgRateLimit::migrate):
///
/// ```sql
/// CREATE TABLE loadlock_rate_limit (
///     namespace     text PRIMARY KEY,
///     tat           timestamptz NOT NULL,  -- GCRA theoretical arrival time
///     blocked_until timestamptz            -- a provider-requested pause
/// );
/// ```
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use std::num::NonZeroU32;
/// use loadlock::{PgRateLimit, Quota};
///
/// let limiter_pool = sqlx::postgres::PgPoolOptions::new()
///     .max_connections(2)
///     .connect("postgres://localhost/app")
///     .await?;
/// let budget = PgRateLimit::new(limiter_pool, Quota::per_second(NonZeroU32::new(10).unwrap()))?;
/// budget.migrate().await?;
/// // Cache::builder(provider).fleet_rate_limit(budget.clone()) on every instance
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PgRateLimit {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    table: TableName,
    quota: Quota,
    reserve: Sql,
    pause: Sql,
    paused_for: Sql,
    prepared: bool,
}

impl fmt::Debug for PgRateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgRateLimit")
            .field("table", &self.inner.table.to_string())
            .field("quota", &self.inner.quota)
            .finish_non_exhaustive()
    }
}

impl PgRateLimit {
    /// Connects to `url` with a pool of its own (two connections, as
    /// recommended above) and a budget of `quota` in the table
    /// `loadlock_rate_limit`; no `sqlx` needed in your manifest. Call
    /// [`migrate`](Self::migrate) next.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `url` is not a Postgres URL; [`Error::Store`]
    /// when the server cannot be reached or refuses the connection.
    pub async fn connect(url: &str, quota: Quota) -> Result<Self, Error> {
        let pool = super::connect_pool(url, 2).await?;
        Self::new(pool, quota)
    }

    /// A fleet-wide budget of `quota` provider calls, in the table
    /// `loadlock_rate_limit`.
    ///
    /// # Errors
    ///
    /// Never, with the default table; see [`with_table`](Self::with_table).
    pub fn new(pool: PgPool, quota: Quota) -> Result<Self, Error> {
        Self::with_table(pool, quota, "loadlock_rate_limit")
    }

    /// The same, in the table `table` (`table` or `schema.table`).
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid table name.
    pub fn with_table(pool: PgPool, quota: Quota, table: &str) -> Result<Self, Error> {
        Self::build(pool, quota, TableName::parse(table)?, true)
    }

    /// The same budget with its statements prepared once per connection
    /// (the default) or not: turn it off behind a transaction pooler that
    /// does not keep prepared statements, as
    /// [`PgStoreBuilder::prepared_statements`](super::PgStoreBuilder::prepared_statements)
    /// explains (each charge then runs in a transaction of its own).
    #[must_use]
    pub fn prepared_statements(self, prepared: bool) -> Self {
        let inner = &self.inner;
        Self::build(
            inner.pool.clone(),
            inner.quota,
            inner.table.clone(),
            prepared,
        )
        .expect("an already validated table")
    }

    fn build(pool: PgPool, quota: Quota, table: TableName, prepared: bool) -> Result<Self, Error> {
        let t = table.quoted("");
        let reserve_fn = table.quoted("_reserve");
        Ok(PgRateLimit {
            inner: Arc::new(Inner {
                pool,
                quota,
                reserve: Sql::new(
                    format!("SELECT wait, reserved FROM {reserve_fn}($1, $2, $3)"),
                    prepared,
                ),
                pause: Sql::new(format!(
                    "INSERT INTO {t} AS r (namespace, tat, blocked_until) \
                     VALUES ($1, clock_timestamp(), clock_timestamp() + make_interval(secs => $2)) \
                     ON CONFLICT (namespace) DO UPDATE SET blocked_until = \
                       greatest(coalesce(r.blocked_until, '-infinity'), EXCLUDED.blocked_until)"
                ), prepared),
                paused_for: Sql::new(format!(
                    "SELECT coalesce(greatest(extract(epoch FROM blocked_until - clock_timestamp()), 0), 0)::float8 \
                     FROM {t} WHERE namespace = $1"
                ), prepared),
                table,
                prepared,
            }),
        })
    }

    /// The quota every instance shares.
    pub fn quota(&self) -> Quota {
        self.inner.quota
    }

    /// Creates the table and its functions; idempotent and safe when many
    /// instances call it at once (serialized by an advisory lock).
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when a statement fails.
    pub async fn migrate(&self) -> Result<(), Error> {
        let table = &self.inner.table;
        let t = table.quoted("");
        let mut statements = Vec::new();
        if let Some(schema) = table.schema() {
            statements.push(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""));
        }
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
                 namespace text PRIMARY KEY, \
                 tat timestamptz NOT NULL, \
                 blocked_until timestamptz)"
        ));
        // GCRA: a call conforms when tat - now <= tolerance; it then moves
        // tat to max(tat, now) + emission. Returns the seconds to wait (0 when
        // charged). The row lock makes the check and the charge atomic.
        // Instances of earlier versions charge with it (and wait and ask
        // again); it keeps the same GCRA as `_reserve`, so a fleet in the
        // middle of an upgrade stays within the quota.
        statements.push(format!(
            "CREATE OR REPLACE FUNCTION {charge}(ns text, emission float8, tolerance float8) \
             RETURNS float8 LANGUAGE plpgsql AS $fn$ \
             DECLARE cur timestamptz; blocked timestamptz; t timestamptz; base timestamptz; \
             BEGIN \
               INSERT INTO {t} (namespace, tat) VALUES (ns, clock_timestamp()) \
                 ON CONFLICT (namespace) DO NOTHING; \
               SELECT tat, blocked_until INTO cur, blocked FROM {t} WHERE namespace = ns FOR UPDATE; \
               t := clock_timestamp(); \
               IF blocked IS NOT NULL AND blocked > t THEN \
                 RETURN extract(epoch FROM blocked - t); \
               END IF; \
               base := greatest(cur, t); \
               IF extract(epoch FROM base - t) > tolerance THEN \
                 RETURN extract(epoch FROM base - t) - tolerance; \
               END IF; \
               UPDATE {t} SET tat = base + make_interval(secs => emission) WHERE namespace = ns; \
               RETURN 0; \
             END $fn$",
            charge = table.quoted("_charge"),
        ));
        // The same GCRA, reserving: a call that does not conform now is
        // charged for the moment it will (tat - tolerance), and tat moves
        // on as if it had come then, so the next call's turn is after it.
        // Returns the seconds until the turn and `true`; while the
        // namespace is paused, the seconds left of the pause and `false`
        // (nothing charged: ask again after it).
        statements.push(format!(
            "CREATE OR REPLACE FUNCTION {reserve}(ns text, emission float8, tolerance float8) \
             RETURNS TABLE (wait float8, reserved boolean) LANGUAGE plpgsql AS $fn$ \
             DECLARE cur timestamptz; blocked timestamptz; t timestamptz; base timestamptz; \
             BEGIN \
               INSERT INTO {t} (namespace, tat) VALUES (ns, clock_timestamp()) \
                 ON CONFLICT (namespace) DO NOTHING; \
               SELECT r.tat, r.blocked_until INTO cur, blocked FROM {t} r \
                 WHERE r.namespace = ns FOR UPDATE; \
               t := clock_timestamp(); \
               IF blocked IS NOT NULL AND blocked > t THEN \
                 RETURN QUERY SELECT extract(epoch FROM blocked - t)::float8, false; \
                 RETURN; \
               END IF; \
               base := greatest(cur, t); \
               UPDATE {t} SET tat = base + make_interval(secs => emission) WHERE namespace = ns; \
               RETURN QUERY SELECT greatest(extract(epoch FROM base - t) - tolerance, 0)::float8, \
                                   true; \
             END $fn$",
            reserve = table.quoted("_reserve"),
        ));
        let fail = |e| Error::store(format!("migrating the rate limit table {table}"), e);
        let mut tx = super::migrate::begin_migration(&self.inner.pool, table, self.inner.prepared)
            .await
            .map_err(fail)?;
        for statement in statements {
            Sql::new(statement, self.inner.prepared)
                .query()
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)
    }

    fn error(&self, doing: &str, err: sqlx::Error) -> Error {
        let missing =
            super::store::sql_state(&err).is_some_and(|code| code == "42P01" || code == "42883");
        if missing {
            return Error::store(
                format!(
                    "{doing}: rate limit table {} is missing; call PgRateLimit::migrate() once at startup",
                    self.inner.table
                ),
                err,
            );
        }
        Error::store(format!("{doing} ({})", self.inner.table), err)
    }
}

impl PgRateLimit {
    /// Runs one statement on a pooled connection; without prepared
    /// statements, in a transaction of its own (a transaction pooler then
    /// keeps one server connection for its parse and its execution).
    async fn pinned<'s, T: Send>(
        &'s self,
        statement: impl for<'c> FnOnce(
                &'c mut sqlx::PgConnection,
            ) -> futures::future::BoxFuture<'c, Result<T, sqlx::Error>>
            + Send
            + 's,
    ) -> Result<T, sqlx::Error> {
        use sqlx::Connection;
        let mut conn = self.inner.pool.acquire().await?;
        if self.inner.prepared {
            return statement(&mut conn).await;
        }
        let mut tx = conn.begin().await?;
        let answer = statement(&mut tx).await?;
        tx.commit().await?;
        Ok(answer)
    }
}

#[async_trait::async_trait]
impl FleetLimiter for PgRateLimit {
    async fn reserve(&self, namespace: &str) -> Result<FleetTurn, Error> {
        let quota = self.inner.quota;
        let reserve = self
            .inner
            .reserve
            .query_as::<(f64, bool)>()
            .bind(namespace.to_owned())
            .bind(quota.emission_interval().as_secs_f64())
            .bind(quota.tolerance().as_secs_f64());
        let (wait, reserved) = self
            .pinned(|conn| Box::pin(reserve.fetch_one(conn)))
            .await
            .map_err(|e| self.error("charging the fleet rate limit", e))?;
        // An unreadable wait is taken as a second (a turn is at most that
        // late; a pause is asked about again).
        let wait = Duration::try_from_secs_f64(wait).unwrap_or(Duration::from_secs(1));
        Ok(if reserved {
            FleetTurn::In(wait)
        } else {
            // At least 1 µs, so a pause is never taken for a turn.
            FleetTurn::Paused(wait.max(Duration::from_micros(1)))
        })
    }

    async fn paused_for(&self, namespace: &str) -> Result<Duration, Error> {
        let read = self
            .inner
            .paused_for
            .query_scalar()
            .bind(namespace.to_owned());
        let wait: Option<f64> = self
            .pinned(|conn| Box::pin(read.fetch_optional(conn)))
            .await
            .map_err(|e| self.error("reading the fleet pause", e))?;
        Ok(wait
            .and_then(|w| Duration::try_from_secs_f64(w).ok())
            .unwrap_or_default())
    }

    async fn pause(&self, namespace: &str, delay: Duration) -> Result<(), Error> {
        let write = self
            .inner
            .pause
            .query()
            .bind(namespace.to_owned())
            .bind(delay.as_secs_f64());
        self.pinned(|conn| Box::pin(write.execute(conn)))
            .await
            .map_err(|e| self.error("recording the fleet pause", e))?;
        tracing::info!(
            namespace,
            delay_ms = delay.as_millis() as u64,
            "provider asked to back off; fleet paused"
        );
        Ok(())
    }
}
