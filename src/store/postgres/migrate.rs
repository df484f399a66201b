//! [`PgStore::migrate`]: creates and upgrades the table, once, however many
//! instances start at the same moment.

use sqlx::postgres::{PgPool, Postgres};
use sqlx::{Row, Transaction};

use super::sql::{history_table, MIGRATIONS};
use super::table::{Sql, TableName};
use super::PgStore;
use crate::store::lock_id;
use crate::Error;

/// Opens the transaction of a migration of `table`, holding the advisory
/// lock that serializes every migration of that table (the cache table's
/// and the rate limit table's alike), whichever instance runs it.
pub(super) async fn begin_migration(
    pool: &PgPool,
    table: &TableName,
    prepared: bool,
) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    Sql::fixed("SELECT pg_advisory_xact_lock($1)", prepared)
        .query()
        .bind(lock_id("loadlock/migrate", &table.to_string()))
        .execute(&mut *tx)
        .await?;
    Ok(tx)
}

impl PgStore {
    /// Creates the table (and its schema, if qualified) or upgrades it to the
    /// current version, recording applied versions in `<table>_migrations`.
    ///
    /// Idempotent, and safe to call from every instance at startup: one
    /// transaction, serialized by an advisory lock on the table's name, so
    /// concurrent calls apply each migration exactly once and the others find
    /// nothing left to do.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled migration rolls back as a whole.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when a statement fails (for example, the role may not
    /// create tables), or when the table was migrated by a newer version of
    /// this crate than this one.
    pub async fn migrate(&self) -> Result<(), Error> {
        let inner = &*self.inner;
        let table = &inner.table;
        let fail = |doing: &str, err| self.error(doing, err);

        let mut tx = begin_migration(&inner.pool, table, inner.prepared)
            .await
            .map_err(|e| fail("starting the migration", e))?;
        for statement in history_table(table) {
            Sql::new(statement, inner.prepared)
                .query()
                .execute(&mut *tx)
                .await
                .map_err(|e| fail("creating the migration history", e))?;
        }
        let applied: i32 = Sql::new(
            format!(
                "SELECT coalesce(max(version), 0) FROM {}",
                table.quoted("_migrations")
            ),
            inner.prepared,
        )
        .query()
        .fetch_one(&mut *tx)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(|e| fail("reading the migration history", e))?;

        let latest = MIGRATIONS.last().map_or(0, |m| m.version);
        if applied > latest {
            return Err(Error::Store {
                message: format!(
                    "table {table} is at schema version {applied}, newer than this \
                     version of loadlock knows ({latest}); upgrade loadlock"
                )
                .into(),
                source: None,
            });
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
            for statement in (migration.statements)(table, inner.unlogged) {
                Sql::new(statement, inner.prepared)
                    .query()
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| fail(migration.description, e))?;
            }
            Sql::new(
                format!(
                    "INSERT INTO {} (version, description) VALUES ($1, $2)",
                    table.quoted("_migrations")
                ),
                inner.prepared,
            )
            .query()
            .bind(migration.version)
            .bind(migration.description)
            .execute(&mut *tx)
            .await
            .map_err(|e| fail("recording a migration", e))?;
            tracing::info!(%table, version = migration.version, "applied cache table migration");
        }
        tx.commit()
            .await
            .map_err(|e| fail("committing the migration", e))
    }
}
