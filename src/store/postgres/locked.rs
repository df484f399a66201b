//! Short `READ COMMITTED` transactions holding advisory locks: what
//! invalidations, writes, compare-and-sets and held-transaction fills run
//! in.
//!
//! What it guarantees: the namespace's lock (shared, or exclusive for a
//! whole-namespace operation) is taken before any key's, and the keys' in
//! ascending id order, in one statement, so no two transactions wait on
//! each other in a cycle; the statement's wait is bounded as a whole by the
//! lock timeout; the transaction's idle time by the idle-in-transaction
//! timeout. Dropping the transaction before `COMMIT` rolls back, which
//! releases the locks and writes nothing.

use sqlx::postgres::Postgres;
use sqlx::{Connection, PgConnection, Transaction};

use super::store::pg_millis;
use super::{LockMode, PgStore};
use crate::store::{lock_id, namespace_lock_id};
use crate::Error;

/// What a transaction locks.
pub(super) enum Locks {
    /// The keys of these lock ids (and their namespace, shared).
    Keys(Vec<i64>),
    /// The whole namespace, exclusively.
    Namespace,
}

impl PgStore {
    /// What this store's lock mode locks for `keys`.
    pub(super) fn locks_for<'k>(
        &self,
        namespace: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Locks {
        match self.inner.lock_mode {
            LockMode::PerKey => Locks::Keys(
                keys.into_iter()
                    .map(|key| lock_id(namespace, key))
                    .collect(),
            ),
            LockMode::Namespace => Locks::Namespace,
        }
    }

    /// Opens a bounded transaction on `conn` holding `locks`; with
    /// `try_only`, `None` (holding nothing) when any lock is taken.
    pub(super) async fn begin_locked<'c>(
        &self,
        conn: &'c mut PgConnection,
        namespace: &str,
        locks: Locks,
        try_only: bool,
    ) -> Result<Option<Transaction<'c, Postgres>>, Error> {
        let inner = &*self.inner;
        let namespace_id = namespace_lock_id(namespace);
        let whole_namespace = matches!(locks, Locks::Namespace);
        let ids = match locks {
            Locks::Keys(ids) => ids,
            Locks::Namespace => Vec::new(),
        };
        let keys = ids.len();
        self.count_round_trips(1);
        let mut tx = conn
            .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(|e| self.error("starting a transaction", e))?;
        self.count_round_trips(1);
        inner
            .sql
            .bound_transaction
            .query()
            .bind(pg_millis(inner.lock_timeout))
            .bind(pg_millis(inner.idle_in_transaction_timeout))
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("bounding the transaction", e))?;
        self.count_round_trips(1);
        if try_only {
            let taken: bool = if whole_namespace {
                inner
                    .sql
                    .try_lock_namespace
                    .query_scalar()
                    .bind(namespace_id)
                    .fetch_one(&mut *tx)
                    .await
            } else {
                inner
                    .sql
                    .try_lock
                    .query_scalar()
                    .bind(&ids)
                    .bind(namespace_id)
                    .fetch_one(&mut *tx)
                    .await
            }
            .map_err(|e| self.error("trying the keys' locks", e))?;
            // Dropping `tx` rolls back, releasing whatever was taken.
            return Ok(taken.then_some(tx));
        }
        let budget = inner.lock_timeout.as_secs_f64();
        let locked = if whole_namespace {
            inner
                .sql
                .lock_namespace
                .query()
                .bind(namespace_id)
                .bind(budget)
                .execute(&mut *tx)
                .await
        } else {
            inner
                .sql
                .lock
                .query()
                .bind(&ids)
                .bind(namespace_id)
                .bind(budget)
                .execute(&mut *tx)
                .await
        };
        match locked {
            Ok(_) => Ok(Some(tx)),
            Err(err) => Err(self.db_error("taking the keys' locks", Some((namespace, keys)), err)),
        }
    }

    /// [`begin_locked`](Self::begin_locked), waiting for the locks.
    pub(super) async fn lock<'c>(
        &self,
        conn: &'c mut PgConnection,
        namespace: &str,
        locks: Locks,
    ) -> Result<Transaction<'c, Postgres>, Error> {
        self.begin_locked(conn, namespace, locks, false)
            .await?
            .ok_or_else(|| Error::Store {
                message: "the locks were not taken".into(),
                source: None,
            })
    }

    /// [`lock`](Self::lock) of what this store's lock mode locks for `keys`.
    pub(super) async fn lock_keys<'c, 'k>(
        &self,
        conn: &'c mut PgConnection,
        namespace: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Result<Transaction<'c, Postgres>, Error> {
        let locks = self.locks_for(namespace, keys);
        self.lock(conn, namespace, locks).await
    }

    pub(super) async fn commit(
        &self,
        tx: Transaction<'_, Postgres>,
        doing: &str,
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        tx.commit().await.map_err(|e| self.error(doing, e))
    }
}
