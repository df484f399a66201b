//! The optimistic read: one statement, no transaction, no lock. It never
//! waits for a fill (fills hold no row a read needs), so a hit costs one
//! round trip whatever else is going on.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{Executor, Row};

use super::PgStore;
use crate::store::Lookup;
use crate::{Entry, Error};

impl PgStore {
    /// A fill's re-read of `keys` (deduplicated) of `namespace`; aligned
    /// with `keys`, bounded by the query timeout. Urgent: the fill's joiners
    /// wait for it.
    pub(super) async fn read<V>(
        &self,
        namespace: &str,
        keys: &[&str],
        grace: Duration,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        self.read_keys(namespace, keys, grace, false).await
    }

    /// The optimistic read of a batch: [`read`](Self::read), not urgent, and
    /// when it missed a key its connection is offered to the claim that
    /// follows (which would otherwise queue for the pool again; see
    /// `handoff`).
    pub(super) async fn read_optimistic<V>(
        &self,
        namespace: &str,
        keys: &[&str],
        grace: Duration,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        self.read_keys(namespace, keys, grace, true).await
    }

    async fn read_keys<V>(
        &self,
        namespace: &str,
        keys: &[&str],
        grace: Duration,
        batch: bool,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        let then = |store: &PgStore, conn, looked: &Result<Vec<Lookup<V>>, Error>| match looked {
            Ok(looked)
                if batch
                    && looked
                        .iter()
                        .any(|lookup| !matches!(lookup, Lookup::Hit(_) | Lookup::NegativeHit)) =>
            {
                crate::handoff::offer(store.id(), conn);
            }
            _ => store.done_with(conn, looked),
        };
        on_conn!(
            self,
            "reading cache rows",
            Duration::ZERO,
            None,
            !batch,
            then then,
            |conn| async {
                let rows = self.select_rows(conn, namespace, keys, grace).await?;
                Ok(self.lookups(rows, namespace, keys))
            }
        )
    }

    /// The read statement on `executor` (a connection, or a transaction
    /// holding the keys' locks).
    pub(super) async fn select_rows<'c, E>(
        &self,
        executor: E,
        namespace: &str,
        keys: &[&str],
        grace: Duration,
    ) -> Result<Vec<PgRow>, sqlx::Error>
    where
        E: Executor<'c, Database = Postgres>,
    {
        self.count_round_trips(1);
        sqlx::query(&self.inner.sql.select_fresh)
            .bind(namespace)
            .bind(keys)
            .bind(grace.as_secs_f64())
            .fetch_all(executor)
            .await
    }

    /// The rows of a read, aligned with `keys`.
    pub(super) fn lookups<V>(
        &self,
        rows: Vec<PgRow>,
        namespace: &str,
        keys: &[&str],
    ) -> Vec<Lookup<V>>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        let position: HashMap<&str, usize> =
            keys.iter().enumerate().map(|(i, &key)| (key, i)).collect();
        let mut found = vec![Lookup::Miss; keys.len()];
        for row in rows {
            let Some(&i) = row
                .try_get::<&str, _>(0)
                .ok()
                .and_then(|key| position.get(key))
            else {
                continue;
            };
            found[i] = decode_value(&row, namespace, keys[i]);
        }
        found
    }
}

/// Decodes a read row (`key, value, fresh, version, fetched_at,
/// expires_at`): a hit, a negative entry (NULL), or undecodable.
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
pub(super) fn row_meta(row: &PgRow, first: usize) -> (u64, SystemTime, SystemTime) {
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
