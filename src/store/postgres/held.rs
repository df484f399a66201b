//! The held-transaction fill ([`FillMode::HeldTransaction`](super::FillMode::HeldTransaction),
//! and every fill in [`LockMode::Namespace`](super::LockMode::Namespace)).
//!
//! What it guarantees: exactly once across the fleet, by holding the keys'
//! advisory locks (in one bounded `READ COMMITTED` transaction per group)
//! from the re-read through the provider call to the commit of the values.
//! A holder that dies releases its keys at once (its session ends). The
//! cost: a pooled connection and an open transaction for the provider's
//! whole latency, bounded by the idle-in-transaction timeout.

use std::time::{Duration, Instant};

use super::rows::{Encoded, Written};
use super::{LockMode, PgStore};
use crate::store::{Fill, Filled, Lookup};
use crate::{BatchFetch, Error};

impl PgStore {
    /// A fill in held transactions, group by group; with `try_only` (a
    /// background refresh, one group), `None` when a lock is taken.
    pub(super) async fn fill_held<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        try_only: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let displayed: Vec<String> = fill.keys().iter().map(ToString::to_string).collect();
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..displayed.len()).map(|_| None).collect();
        let indices: Vec<usize> = (0..displayed.len()).collect();
        let group_size = match (try_only, self.inner.lock_mode) {
            (true, _) | (_, LockMode::Namespace) => indices.len().max(1),
            (false, LockMode::PerKey) => self.group_size(fill.max_batch_size()),
        };
        // Groups run one after another: a transaction never waits for a lock
        // while holding another group's locks. Each group commits on its own.
        for group in indices.chunks(group_size) {
            if !self
                .fill_group(fill, &displayed, group, &mut answers, try_only)
                .await?
            {
                return Ok(None);
            }
        }
        Ok(Some(
            answers
                .into_iter()
                .collect::<Option<Vec<_>>>()
                .ok_or_else(crate::store::unsettled)?,
        ))
    }

    /// One fill transaction over `group` (indices into `fill.keys()`);
    /// false when `try_only` found a lock taken.
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
        let keys: Vec<&str> = group.iter().map(|&i| displayed[i].as_str()).collect();
        // The provider's budget for the first call, before anything is
        // locked: while the budget is exhausted, nothing is held.
        fill.prepay_first_call(group.len().min(fill.max_batch_size()))
            .await?;
        let bound = inner.lock_timeout + inner.idle_in_transaction_timeout;
        in_conn!(self, "filling keys", bound, |conn| async {
            let started = Instant::now();
            let locked = self
                .begin_locked(
                    conn,
                    namespace,
                    self.locks_for(namespace, keys.iter().copied()),
                    try_only,
                )
                .await;
            fill.record_lock_wait(started.elapsed());
            let Some(mut tx) = locked? else {
                return Ok(false);
            };
            // A new statement, so a new snapshot: it sees what others
            // committed while we waited for the locks.
            let rows = self
                .select_rows(&mut *tx, namespace, &keys, Duration::ZERO)
                .await
                .map_err(|e| self.error("reading cache rows", e))?;
            let reread: Vec<Lookup<F::Value>> = self.lookups(rows, namespace, &keys);
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

            let missing_keys: Vec<F::Key> =
                missing.iter().map(|&i| fill.keys()[i].clone()).collect();
            let fetched = fill.fetch_each(&missing_keys).await?;
            // Keys the provider failed alone are answered with their error;
            // nothing is written for them.
            let answered = crate::store::answer_failed(fetched, &missing, missing_keys, answers);
            if answered.indices.is_empty() {
                fill.about_to_commit(group);
                self.commit(tx, "ending a fill transaction").await?;
                return Ok(true);
            }
            let rows = Encoded::new(
                displayed,
                &answered.indices,
                &answered.keys,
                answered.values,
            )?;
            self.count_round_trips(1);
            let written = inner
                .sql
                .upsert
                .query()
                .bind(namespace)
                .bind(&rows.keys)
                .bind(&rows.values)
                .bind(fill.ttl().as_secs_f64())
                .bind(fill.negative_ttl().as_secs_f64())
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.error("writing cache rows", e))?;
            // The upsert writes every row; a key it did not return is left
            // unanswered and reported as such.
            let written = written
                .iter()
                .filter_map(|row| Written::from_row(row, 1))
                .collect();
            rows.settle(written, answers);
            fill.about_to_commit(group);
            self.commit(tx, "committing a fill").await?;
            Ok(true)
        })
    }
}
