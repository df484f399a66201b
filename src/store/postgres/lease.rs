//! The lease protocol of a fill ([`FillMode::Lease`](super::FillMode::Lease)).
//!
//! What it guarantees:
//!
//! * **Exactly once across the fleet.** A key is fetched only by the holder
//!   of its live lease, and a claim leases a key only when, under the key's
//!   advisory lock, it has no fresh row and no live lease.
//! * **Nothing held across the provider.** The claim is one statement (its
//!   own short transaction); the provider is called holding no connection,
//!   no transaction and no lock; the publish is one statement.
//! * **No stale write, no stale delivery.** The publish writes a key only
//!   where the lease is still this fill's (an invalidation, a write, a
//!   compare-and-set or a new namespace generation revokes it). A value
//!   fetched under a revoked lease is delivered to nobody: the key is
//!   claimed again. A value the claim or a re-read found is delivered only
//!   to loads that joined before the read began.
//! * **Bounded.** The claim's lock wait is bounded as a whole, every round
//!   trip by the query timeout, a wait for another holder by its lease (a
//!   lease past its expiry is taken over), and the number of rounds.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::Row;

use super::read::row_meta;
use super::store::pg_millis;
use super::PgStore;
use crate::store::{lock_id, namespace_lock_id, Fill, Filled, Lookup};
use crate::{BatchFetch, Entry, Error};

/// A lease's margin over the longest its fetch may take: a fixed part for
/// the round trips around the fetch, and a tenth for clock drift.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// How soon a fill waiting for another holder looks again when no
/// notification comes (the listener may be connecting): the first time,
/// then doubling up to [`MAX_POLL`].
const POLL: Duration = Duration::from_millis(50);
const MAX_POLL: Duration = Duration::from_secs(1);

/// Rounds of claims one fill makes before it gives up: a round ends when
/// every key was fetched, found, or found leased by another and waited for.
const MAX_ROUNDS: u32 = 64;

/// How many times one fill accepts losing its leases (revoked by
/// invalidations while it fetched) before it fails with
/// [`Error::Contended`].
const MAX_REVOKED: u32 = 4;

/// A fill that ended with a key unanswered: a bug, reported, never a panic.
pub(super) fn unsettled() -> Error {
    Error::Store {
        message: "a fill left a key unanswered".into(),
        source: None,
    }
}

/// The lease a fetch bounded by `fetch` needs.
pub(super) fn lease_for(fetch: Duration) -> Duration {
    fetch
        .saturating_add(fetch / 10)
        .saturating_add(LEASE_MARGIN)
}

/// The longest fetch a lease of at most `max_lease` covers.
pub(super) fn longest_covered_fetch(max_lease: Duration) -> Duration {
    max_lease.saturating_sub(LEASE_MARGIN) * 10 / 11
}

/// What a claim answered for one key.
enum Claimed<V> {
    /// A fresh row: a value, or a negative entry (`None`).
    Found(Option<Entry<V>>),
    /// A fresh row that no longer decodes into the cache's value type.
    Undecodable,
    /// Leased by this claim.
    Leased,
    /// Leased by a live holder, for this long still.
    Busy(Duration),
}

/// The leases of one claim; dropping it before [`settled`](Held::settled)
/// (a cancelled fill) releases them in the background, so waiters are not
/// held until expiry.
struct Held {
    store: PgStore,
    namespace: String,
    token: i64,
    keys: Vec<String>,
}

impl Held {
    fn settled(mut self) {
        self.keys.clear();
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let (store, namespace, keys, token) = (
            self.store.clone(),
            std::mem::take(&mut self.namespace),
            std::mem::take(&mut self.keys),
            self.token,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store.release(&namespace, &keys, token).await;
            });
        }
    }
}

impl PgStore {
    /// A fill under leases; with `try_only` (a background refresh), gives up
    /// (`None`, releasing what it leased) when any key is found or leased by
    /// someone else.
    pub(super) async fn fill_leased<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        try_only: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let namespace = fill.namespace();
        let texts: Vec<String> = fill.keys().iter().map(ToString::to_string).collect();
        let mut answers: Vec<Option<Filled<F::Value>>> = (0..texts.len()).map(|_| None).collect();
        let group_size = self.lease_group_size(fill);
        let mut pending: Vec<usize> = (0..texts.len()).collect();
        let mut revoked_rounds = 0;
        let mut poll = POLL;
        // Listening from the first fill on, so that a wait for another
        // holder is woken by its publish rather than by the poll.
        let _ = self.events();
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return Ok(Some(
                    answers
                        .into_iter()
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(unsettled)?,
                ));
            }
            // Registered before claiming: a publish between the claim and
            // the wait still wakes it.
            let keys_pending: Vec<String> = pending.iter().map(|&i| texts[i].clone()).collect();
            let registration = self.inner.waiters.register(namespace, &keys_pending);
            let mut next = Vec::new();
            let mut recheck = Vec::new();
            let mut busy_for: Option<Duration> = None;
            let mut revoked = false;
            for group in pending.chunks(group_size) {
                let group_texts: Vec<String> = group.iter().map(|&i| texts[i].clone()).collect();
                let lease = lease_for(fill.fetch_bound(group.len()));
                let started = Instant::now();
                let (token, taken_over, claimed) = self
                    .claim::<F::Value>(namespace, &group_texts, lease)
                    .await?;
                fill.record_lock_wait(started.elapsed());
                fill.record_takeovers(taken_over);
                let mut leased = Vec::new();
                for (&i, claimed) in group.iter().zip(claimed) {
                    match claimed {
                        Claimed::Leased => leased.push(i),
                        Claimed::Found(_) => recheck.push(i),
                        Claimed::Undecodable => {
                            // Made a miss (a tombstone), then claimed again.
                            self.invalidate_group(namespace, &texts[i..=i], None)
                                .await?;
                            next.push(i);
                        }
                        Claimed::Busy(left) => {
                            fill.record_lease_wait(1);
                            busy_for = Some(busy_for.map_or(left, |b| b.min(left)));
                            recheck.push(i);
                        }
                    }
                }
                let held = Held {
                    store: self.clone(),
                    namespace: namespace.to_owned(),
                    token,
                    keys: leased.iter().map(|&i| texts[i].clone()).collect(),
                };
                if try_only && leased.len() < group.len() {
                    drop(held);
                    return Ok(None);
                }
                if leased.is_empty() {
                    held.settled();
                    continue;
                }
                let lost = self
                    .fetch_and_publish(fill, &texts, &leased, held, &mut answers)
                    .await?;
                if !lost.is_empty() {
                    revoked = true;
                    fill.record_revoked(lost.len());
                    next.extend(lost);
                }
            }
            if revoked {
                revoked_rounds += 1;
                if revoked_rounds > MAX_REVOKED {
                    return Err(Error::Contended {
                        namespace: namespace.into(),
                        keys: next.len(),
                        rounds: revoked_rounds,
                    });
                }
            }
            if !recheck.is_empty() {
                if let Some(left) = busy_for {
                    // Woken by the holder's publish; the poll covers a
                    // listener that is (re)connecting, the lease's expiry a
                    // holder that died.
                    tokio::select! {
                        () = registration.woken() => {}
                        () = tokio::time::sleep(poll.min(left + Duration::from_millis(5))) => {
                            poll = (poll * 2).min(MAX_POLL);
                        }
                    }
                }
                // Leave first, then read: whoever joins from now on reads
                // the store itself, so nobody receives a value read before
                // it joined.
                fill.about_to_commit(&recheck);
                let keys: Vec<String> = recheck.iter().map(|&i| texts[i].clone()).collect();
                let looked = self
                    .read::<F::Value>(namespace, &keys, Duration::ZERO)
                    .await?;
                for (&i, lookup) in recheck.iter().zip(looked) {
                    match lookup {
                        Lookup::Hit(entry) => answers[i] = Some(Filled::Stored(Some(entry))),
                        Lookup::NegativeHit => answers[i] = Some(Filled::Stored(None)),
                        _ => next.push(i),
                    }
                }
            }
            drop(registration);
            next.sort_unstable();
            pending = next;
        }
        Err(Error::Contended {
            namespace: namespace.into(),
            keys: pending.len(),
            rounds: MAX_ROUNDS,
        })
    }

    /// The most keys one claim covers: a whole number of provider calls
    /// within the lock cap, and no more calls than one lease can cover.
    fn lease_group_size<F: BatchFetch>(&self, fill: &Fill<'_, F>) -> usize {
        let batch = fill.max_batch_size().max(1);
        let by_locks = self.group_size(batch);
        let covered = longest_covered_fetch(self.inner.max_lease);
        let mut calls = 1;
        while calls < by_locks.div_ceil(batch) && fill.fetch_bound((calls + 1) * batch) <= covered {
            calls += 1;
        }
        by_locks.min(calls * batch).max(1)
    }

    /// Calls the provider for the leased keys at `leased` (indices into
    /// `texts`) and publishes the answers; returns the keys whose lease was
    /// revoked meanwhile (nothing written for them, nothing delivered).
    async fn fetch_and_publish<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        texts: &[String],
        leased: &[usize],
        held: Held,
        answers: &mut [Option<Filled<F::Value>>],
    ) -> Result<Vec<usize>, Error> {
        let namespace = fill.namespace();
        let keys: Vec<F::Key> = leased.iter().map(|&i| fill.keys()[i].clone()).collect();
        let mut fetched = match fill.fetch(&keys).await {
            Ok(fetched) => fetched,
            Err(err) => {
                // At once, so waiters claim the keys themselves instead of
                // waiting for the lease to expire.
                let (token, keys) = (held.token, held.keys.clone());
                held.settled();
                if let Err(release) = self.release(namespace, &keys, token).await {
                    tracing::warn!(namespace, error = %release,
                        "could not release the leases of a failed fill; they expire on their own");
                }
                return Err(err);
            }
        };
        let mut values: HashMap<&str, (usize, F::Value)> = HashMap::with_capacity(leased.len());
        let mut rows: Vec<(&str, Option<String>)> = Vec::with_capacity(leased.len());
        for (&i, key) in leased.iter().zip(&keys) {
            let value = fetched.remove(key);
            let json = match &value {
                Some(value) => Some(serde_json::to_string(value).map_err(|e| {
                    Error::store(format!("value of key {:?} is not JSON", texts[i]), e)
                })?),
                None => None,
            };
            rows.push((texts[i].as_str(), json));
            if let Some(value) = value {
                values.insert(texts[i].as_str(), (i, value));
            }
        }
        rows.sort_by(|a, b| a.0.cmp(b.0));
        rows.dedup_by(|a, b| a.0 == b.0);
        // Joiners from now on read the store: the publish is what they see.
        fill.about_to_commit(leased);
        let written = self.publish(fill, &rows, held.token).await;
        held.settled();
        // Fills of this process waiting for these keys need no notification
        // from the server.
        self.inner.waiters.wake_keys(namespace, &keys_of(&rows));
        let mut lost: Vec<usize> = Vec::new();
        let mut published: HashMap<String, (u64, std::time::SystemTime, std::time::SystemTime)> =
            HashMap::with_capacity(rows.len());
        for row in written? {
            if let Ok(key) = row.try_get::<String, _>(0) {
                published.insert(key, row_meta(&row, 1));
            }
        }
        for &i in leased {
            match published.get(texts[i].as_str()) {
                Some(&(version, fetched_at, expires_at)) => {
                    answers[i] =
                        Some(Filled::Fetched(values.remove(texts[i].as_str()).map(
                            |(_, value)| Entry::new(value, version, fetched_at, expires_at),
                        )));
                }
                None => lost.push(i),
            }
        }
        Ok(lost)
    }

    /// One claim: the keys' locks, the re-read and the leases, in one round
    /// trip; returns the lease token and each key's state, aligned with
    /// `keys`.
    async fn claim<V: serde::de::DeserializeOwned>(
        &self,
        namespace: &str,
        keys: &[String],
        lease: Duration,
    ) -> Result<(i64, usize, Vec<Claimed<V>>), Error> {
        let inner = &*self.inner;
        let ids: Vec<i64> = keys.iter().map(|key| lock_id(namespace, key)).collect();
        let budget = inner.lock_timeout;
        self.count_round_trips(1);
        let rows: Vec<PgRow> = on_conn!(
            self,
            "claiming keys",
            budget,
            Some((namespace, keys.len())),
            |conn| sqlx::query(&inner.sql.claim)
                .bind(namespace)
                .bind(keys)
                .bind(&ids)
                .bind(namespace_lock_id(namespace))
                .bind(&inner.holder)
                .bind(lease.as_secs_f64())
                .bind(budget.as_secs_f64())
                .fetch_all(conn)
        )?;
        let mut token = 0;
        let mut taken_over = 0;
        let mut states: HashMap<String, Claimed<V>> = HashMap::with_capacity(rows.len());
        for row in rows {
            let key: String = row
                .try_get(0)
                .map_err(|e| self.error("reading a claim", e))?;
            let state: String = row
                .try_get(1)
                .map_err(|e| self.error("reading a claim", e))?;
            token = row
                .try_get(6)
                .map_err(|e| self.error("reading a claim", e))?;
            taken_over = usize::try_from(row.try_get::<i64, _>(8).unwrap_or(0)).unwrap_or(0);
            let claimed = match state.as_str() {
                "l" => Claimed::Leased,
                "n" => Claimed::Found(None),
                "h" => match row.try_get::<Option<Json<V>>, _>(2) {
                    Ok(Some(Json(value))) => {
                        let (version, fetched_at, expires_at) = row_meta(&row, 3);
                        Claimed::Found(Some(Entry::new(value, version, fetched_at, expires_at)))
                    }
                    _ => Claimed::Undecodable,
                },
                _ => {
                    let left = row
                        .try_get::<Option<f64>, _>(7)
                        .ok()
                        .flatten()
                        .unwrap_or(0.0);
                    Claimed::Busy(Duration::try_from_secs_f64(left.max(0.0)).unwrap_or_default())
                }
            };
            states.insert(key, claimed);
        }
        let claimed = keys
            .iter()
            .map(|key| states.remove(key).unwrap_or(Claimed::Busy(Duration::ZERO)))
            .collect();
        Ok((token, taken_over, claimed))
    }

    /// Writes `rows` (sorted, deduplicated; `None` a negative entry) where
    /// the lease is still `token`'s; returns the rows written.
    async fn publish<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        rows: &[(&str, Option<String>)],
        token: i64,
    ) -> Result<Vec<PgRow>, Error> {
        let inner = &*self.inner;
        let (keys, values): (Vec<&str>, Vec<Option<&str>>) =
            rows.iter().map(|(k, v)| (*k, v.as_deref())).unzip();
        self.count_round_trips(1);
        on_conn!(
            self,
            "publishing fetched values",
            inner.lock_timeout,
            None,
            |conn| sqlx::query(&inner.sql.publish)
                .bind(fill.namespace())
                .bind(&keys)
                .bind(&values)
                .bind(token)
                .bind(fill.ttl().as_secs_f64())
                .bind(fill.negative_ttl().as_secs_f64())
                .bind(&inner.channel)
                .bind(pg_millis(inner.lock_timeout))
                .fetch_all(conn)
        )
    }

    /// Gives up the leases `token` holds on `keys`, waking their waiters.
    async fn release(&self, namespace: &str, keys: &[String], token: i64) -> Result<(), Error> {
        let inner = &*self.inner;
        // Sorted: rows are locked in key order.
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let keys = &keys;
        self.count_round_trips(1);
        on_conn!(self, "releasing leases", inner.lock_timeout, None, |conn| {
            sqlx::query(&inner.sql.release)
                .bind(namespace)
                .bind(keys)
                .bind(token)
                .bind(&inner.channel)
                .bind(pg_millis(inner.lock_timeout))
                .execute(conn)
        })?;
        self.inner.waiters.wake_keys(namespace, keys);
        Ok(())
    }
}

fn keys_of(rows: &[(&str, Option<String>)]) -> Vec<String> {
    rows.iter().map(|(key, _)| (*key).to_owned()).collect()
}
