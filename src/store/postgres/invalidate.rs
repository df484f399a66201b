//! Invalidations, writes and compare-and-sets: each takes the keys' locks
//! (the same a claim takes), changes the rows, revokes their leases and
//! announces the keys, in one short transaction.
//!
//! What it guarantees: once it returns, no fill that claimed the keys
//! before can publish (its lease is gone) or deliver what it fetched (the
//! fill claims again), and a load that starts afterwards, on any instance,
//! reads past it. A whole-namespace invalidation starts a new generation of
//! the namespace: one row write, whatever the namespace holds.

use std::time::Duration;

use super::locked::Locks;
use super::PgStore;
use crate::Error;

impl PgStore {
    /// One invalidation transaction: the keys' locks, `work` (a write to
    /// the source) if any, then their tombstones, which revoke their leases.
    pub(super) async fn invalidate_group(
        &self,
        namespace: &str,
        keys: &[String],
        work: Option<futures::future::BoxFuture<'_, ()>>,
    ) -> Result<(), Error> {
        // The caller's write runs inside the transaction, bounded by its
        // idle time.
        let extra = self.inner.lock_timeout
            + work
                .as_ref()
                .map_or(Duration::ZERO, |_| self.inner.idle_in_transaction_timeout);
        in_conn!(self, "invalidating keys", extra, |conn| async {
            let mut tx = self
                .lock_keys(conn, namespace, keys.iter().map(String::as_str))
                .await?;
            if let Some(work) = work {
                work.await;
            }
            self.tombstone(&mut tx, namespace, keys).await?;
            self.commit(tx, "committing an invalidation").await
        })
    }

    /// Starts a new generation of `namespace`: every row of the older ones
    /// is a miss from the commit on, and their leases are revoked. Waits
    /// for the namespace's claims and invalidations in progress (they hold
    /// its lock shared), never for a provider call.
    pub(super) async fn invalidate_whole_namespace(&self, namespace: &str) -> Result<(), Error> {
        in_conn!(
            self,
            "invalidating a namespace",
            self.inner.lock_timeout,
            |conn| async {
                let mut tx = self.lock(conn, namespace, Locks::Namespace).await?;
                self.count_round_trips(1);
                self.inner
                    .sql
                    .next_generation
                    .query()
                    .bind(namespace)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.error("invalidating a namespace", e))?;
                self.announce(&mut tx, namespace, None).await?;
                self.commit(tx, "committing an invalidation").await
            }
        )
    }

    /// The compare-and-set of one key's entry, under its lock.
    pub(super) async fn put_if_version_text(
        &self,
        namespace: &str,
        text: String,
        expected: u64,
        json: String,
        ttl: Duration,
    ) -> Result<u64, Error> {
        let expected_i64 = i64::try_from(expected).unwrap_or(i64::MAX);
        let keys = std::slice::from_ref(&text);
        in_conn!(
            self,
            "putting a value",
            self.inner.lock_timeout,
            |conn| async {
                let mut tx = self
                    .lock_keys(conn, namespace, keys.iter().map(String::as_str))
                    .await?;
                self.count_round_trips(1);
                let written: Option<i64> = self
                    .inner
                    .sql
                    .put_if_version
                    .query_scalar()
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
                    let actual: Option<i64> = self
                        .inner
                        .sql
                        .version_of
                        .query_scalar()
                        .bind(namespace)
                        .bind(&text)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(|e| self.error("reading a version", e))?;
                    return Err(Error::VersionMismatch {
                        namespace: namespace.into(),
                        key: text.clone().into(),
                        expected,
                        actual: actual.and_then(|v| u64::try_from(v).ok()),
                    });
                };
                self.announce(&mut tx, namespace, Some(keys)).await?;
                self.commit(tx, "committing a put").await?;
                Ok(u64::try_from(version).unwrap_or(0))
            }
        )
    }

    /// Tombstones `keys` (entries that are never fresh, so never served,
    /// stale or not; their leases revoked) and announces them, inside `tx`.
    async fn tombstone(
        &self,
        tx: &mut sqlx::PgConnection,
        namespace: &str,
        keys: &[String],
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        self.inner
            .sql
            .tombstone
            .query()
            .bind(namespace)
            .bind(keys)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.error("invalidating cache rows", e))?;
        self.announce(tx, namespace, Some(keys)).await
    }

    /// Announces `keys` of `namespace` (all of it for `None`) inside `tx`:
    /// delivered when, and only if, it commits.
    async fn announce(
        &self,
        tx: &mut sqlx::PgConnection,
        namespace: &str,
        keys: Option<&[String]>,
    ) -> Result<(), Error> {
        self.count_round_trips(1);
        self.inner
            .sql
            .notify
            .query()
            .bind(&self.inner.channel)
            .bind(super::events::payloads(namespace, keys))
            .execute(tx)
            .await
            .map_err(|e| self.error("publishing an invalidation", e))?;
        Ok(())
    }
}
