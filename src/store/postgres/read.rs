//! The optimistic read: one statement, no transaction, no lock. It never
//! waits for a fill (fills hold no row a read needs), so a hit costs one
//! round trip whatever else is going on.
//!
//! Reads of batches that queue for a connection together go as one
//! statement (see `combine`): the first opens a group and starts its
//! runner, the others join until the runner has its connection. Every
//! member receives the rows of its own keys, as read by that one statement.
//! When a member missed keys, it also receives what its claim starts from:
//! the claim the read makes for it on the statement's connection, right
//! after the statement (see `preclaim`), or a [`Ticket`] to that
//! connection, so that the claims following the read take it instead of
//! queueing for the pool again. Members that missed nothing are answered
//! before any claim.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use sqlx::postgres::{PgRow, Postgres};
use sqlx::types::Json;
use sqlx::{Executor, Row};

use super::combine;
use super::conn::{Conn, Laned};
use super::preclaim::PendingClaim;
use super::{FillMode, PgStore};
use crate::store::Lookup;
use crate::{Entry, Error};

/// How long the claim holding a [`Ticket`] waits for the other members of
/// its read to join it before it runs without them.
const TICKET_WAIT: Duration = Duration::from_millis(2);

/// What the reads of one statement share: the namespace and the grace.
pub(super) type ReadGroup = (String, Duration);

/// One batch's or fill's part of a combined read: its keys, and whether a
/// [`Ticket`] goes with its misses (a batch's claim follows at once; a
/// fill's re-read may be followed by a wait, across which no connection
/// is held).
pub(super) struct ReadRequest {
    keys: Arc<[String]>,
    ticket: bool,
}

/// What a combined read answers a member: the statement's rows, and when
/// the member missed a key, what its fill's claim starts from.
pub(super) type ReadAnswer = (Arc<ReadRows>, Option<Handed>);

/// What a read hands on to the claim of a batch that missed keys.
pub(super) enum Handed {
    /// A share in the read's connection, for the batch's own claim.
    Ticket(Ticket),
    /// The claim the read made for the batch (see `preclaim`).
    Claimed(PendingClaim),
}

impl Handed {
    /// Offers it to the batch's next statement.
    fn offer(self, store: &PgStore) {
        match self {
            Handed::Ticket(ticket) => crate::handoff::offer(store.id(), ticket),
            Handed::Claimed(claimed) => crate::handoff::offer(store.id(), claimed),
        }
    }
}

/// The rows of one read statement, by key.
pub(super) struct ReadRows {
    rows: Vec<PgRow>,
    by_key: HashMap<String, usize>,
}

impl ReadRows {
    fn new(rows: Vec<PgRow>) -> Self {
        let by_key = rows
            .iter()
            .enumerate()
            .filter_map(|(i, row)| Some((row.try_get::<String, _>(0).ok()?, i)))
            .collect();
        ReadRows { rows, by_key }
    }

    /// Whether `key` has a fresh row (a value or a negative entry).
    fn fresh(&self, key: &str) -> bool {
        self.by_key
            .get(key)
            .is_some_and(|&i| self.rows[i].try_get::<bool, _>(2).unwrap_or(false))
    }

    /// Whether `key` is missing with nothing a batch might serve instead:
    /// no row, or an expired one without a value (a tombstone, an expired
    /// negative entry). Not a stale value, nor one that does not decode.
    fn claimable(&self, key: &str) -> bool {
        match self.by_key.get(key) {
            None => true,
            Some(&i) => {
                let row = &self.rows[i];
                !row.try_get::<bool, _>(2).unwrap_or(true)
                    && row
                        .try_get_raw(1)
                        .is_ok_and(|value| sqlx::ValueRef::is_null(&value))
            }
        }
    }

    /// The lookups of `keys`, aligned with them.
    fn lookups<V>(&self, namespace: &str, keys: &[String]) -> Vec<Lookup<V>>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        keys.iter()
            .map(|key| match self.by_key.get(key.as_str()) {
                Some(&i) => decode_value(&self.rows[i], namespace, key),
                None => Lookup::Miss,
            })
            .collect()
    }
}

/// A share in the connection of a combined read, handed to the claims of
/// the members that missed keys. The first of them to lead a claim
/// [`redeem`](Ticket::redeem)s it: it waits (briefly) until every other
/// holder joined its claim or let go, and takes the connection. When the
/// last share goes unredeemed, the connection goes back to the pool.
pub(super) struct Ticket(Arc<Shares>);

struct Shares {
    conn: Mutex<Option<Conn>>,
    /// Shares not dropped yet.
    outstanding: tokio::sync::watch::Sender<usize>,
}

impl Ticket {
    fn issue(conn: Conn, n: usize) -> Vec<Ticket> {
        let shares = Arc::new(Shares {
            conn: Mutex::new(Some(conn)),
            outstanding: tokio::sync::watch::channel(n).0,
        });
        (0..n).map(|_| Ticket(Arc::clone(&shares))).collect()
    }

    /// The connection, once every other share was dropped (or after
    /// [`TICKET_WAIT`]); `None` when another holder took it.
    pub(super) async fn redeem(self) -> Option<Conn> {
        let mut others = self.0.outstanding.subscribe();
        let _ = tokio::time::timeout(TICKET_WAIT, others.wait_for(|&n| n <= 1)).await;
        let conn = self.0.conn.lock().unwrap_or_else(|e| e.into_inner()).take();
        conn
    }
}

impl Drop for Ticket {
    /// One share fewer; the last one's drop drops an unredeemed connection,
    /// which goes back to the pool.
    fn drop(&mut self) {
        self.0.outstanding.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl PgStore {
    /// A fill's re-read of `keys` (deduplicated) of `namespace`, combined
    /// with the reads that queue with it; aligned with `keys`, bounded by
    /// the query timeout.
    pub(super) async fn read<V>(
        &self,
        namespace: &str,
        keys: Vec<String>,
        grace: Duration,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        self.read_combined(namespace, keys, grace, false).await
    }

    /// The optimistic read of a batch, combined with the reads that queue
    /// with it; when it missed a key, a [`Ticket`] to its connection is
    /// offered to the claim that follows (which would otherwise queue for
    /// the pool again; see `handoff`).
    pub(super) async fn read_optimistic<V>(
        &self,
        namespace: &str,
        keys: Vec<String>,
        grace: Duration,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        self.read_combined(namespace, keys, grace, true).await
    }

    async fn read_combined<V>(
        &self,
        namespace: &str,
        keys: Vec<String>,
        grace: Duration,
        ticket: bool,
    ) -> Result<Vec<Lookup<V>>, Error>
    where
        V: serde::de::DeserializeOwned + Clone,
    {
        let group = (namespace.to_owned(), grace);
        // Alone: keys the database cannot store fail alone, never a group;
        // and with a lane and its connection free and no group waiting
        // there is nothing to combine with or wait for, so the read runs at
        // once, in this task, without a runner to hand over to and back
        // from.
        let alone = !combine::storable(keys.iter().map(String::as_str))
            || (self.inner.lanes.ready() && !self.inner.reads.is_open(&group));
        if alone {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            return self.read_keys(namespace, &keys, grace, ticket).await;
        }
        // Shared with the group, not copied.
        let keys: Arc<[String]> = keys.into();
        let request = ReadRequest {
            keys: Arc::clone(&keys),
            ticket,
        };
        let joined = self.inner.reads.join(&group, request, keys.len());
        if let Some(number) = joined.leads {
            let (store, abandoned) = (self.clone(), self.clone());
            let abandoned_group = group.clone();
            combine::spawn_runner(
                move || abandoned.inner.reads.abandon(&abandoned_group, number),
                async move { store.run_reads(group, number).await },
            );
        }
        let (rows, handed) = combine::answered(joined.answer).await?;
        if let Some(handed) = handed {
            handed.offer(self);
        }
        Ok(rows.lookups(namespace, &keys))
    }

    /// Runs the reads of group `number` of `group` as one statement, once a
    /// connection is at hand, and answers each member.
    async fn run_reads(&self, group: ReadGroup, number: u64) {
        let inner = &*self.inner;
        let mut members = Vec::new();
        let mut kept = None;
        let mut keep = |_: &PgStore, mut conn: Conn, read: &Result<Vec<PgRow>, Error>| {
            if read.is_ok() {
                conn.finish(true);
                kept = Some(conn);
            }
        };
        let outcome = async {
            on_conn!(
                &Laned(self),
                "reading cache rows",
                Duration::ZERO,
                None,
                then keep,
                |conn| {
                    members = inner.reads.close(&group, number);
                    let mut seen = HashSet::new();
                    let keys: Vec<&str> = members
                        .iter()
                        .flat_map(|member| member.request.keys.iter())
                        .map(String::as_str)
                        .filter(|key| seen.insert(*key))
                        .collect();
                    let (namespace, grace) = (&group.0, group.1);
                    async move { self.select_rows(conn, namespace, &keys, grace).await }
                }
            )
        }
        .await;
        if members.is_empty() {
            members = inner.reads.close(&group, number);
        }
        let rows = match outcome {
            Ok(rows) => Arc::new(ReadRows::new(rows)),
            Err(err) => {
                for member in members {
                    member.answer(Err(err.clone()));
                }
                return;
            }
        };
        let missed: Vec<bool> = members
            .iter()
            .map(|member| {
                member.request.ticket && member.request.keys.iter().any(|key| !rows.fresh(key))
            })
            .collect();
        // Members whose keys were all found are answered first: a hit
        // never waits for a claim.
        let lease_mode = self.fill_mode() == FillMode::Lease;
        let mut claiming = Vec::new();
        for (member, missed) in members.into_iter().zip(missed) {
            if missed && lease_mode {
                claiming.push(member);
            } else {
                member.answer(Ok((Arc::clone(&rows), None)));
            }
        }
        if claiming.is_empty() {
            return;
        }
        // The claim made here, when every member that missed keys missed
        // only claimable ones: one claim for all of them.
        let claimable = claiming.iter().all(|member| {
            let mut keys = member.request.keys.iter();
            keys.all(|key| rows.fresh(key) || rows.claimable(key))
        });
        let to_claim: Vec<Vec<&str>> = claiming
            .iter()
            .map(|member| {
                let keys = member.request.keys.iter().map(String::as_str);
                keys.filter(|key| !rows.fresh(key)).collect()
            })
            .collect();
        let pre_claimed = match (kept, claimable) {
            (Some(conn), true) => Some(self.claim_for_read(conn, &group.0, &to_claim)),
            (kept, _) => kept.map(Err),
        };
        let mut handed: Vec<Handed> = match pre_claimed {
            Some(Ok(claim)) => (0..claiming.len())
                .map(|_| Handed::Claimed(claim.clone()))
                .collect(),
            Some(Err(conn)) => Ticket::issue(conn, claiming.len())
                .into_iter()
                .map(Handed::Ticket)
                .collect(),
            None => Vec::new(),
        };
        for member in claiming {
            member.answer(Ok((Arc::clone(&rows), handed.pop())));
        }
    }

    /// Starts the claim of the keys each batch of a read missed (`missed`,
    /// one list per batch) on the read's connection `conn`, in a task of
    /// its own, once the namespace's lease terms are known and each
    /// batch's keys fit one claim; each key is leased as its batch's fill
    /// would lease it (the first batch's, for a key several missed).
    /// Otherwise it gives the connection back, for the batches' own claims.
    fn claim_for_read(
        &self,
        conn: Conn,
        namespace: &str,
        missed: &[Vec<&str>],
    ) -> Result<PendingClaim, Conn> {
        let Some(terms) = self.inner.learned.get(namespace) else {
            return Err(conn);
        };
        let mut seen = HashSet::new();
        let (mut keys, mut secs) = (Vec::new(), Vec::new());
        for batch in missed {
            let Some(lease) = terms.lease(batch.len()) else {
                return Err(conn);
            };
            for &key in batch {
                if seen.insert(key) {
                    keys.push(key.to_owned());
                    secs.push(lease.as_secs_f64());
                }
            }
        }
        // One transaction locks them all: within the cap, or the batches
        // claim for themselves (in groups within it).
        if keys.len() > self.inner.max_locks_per_transaction {
            return Err(conn);
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(conn);
        };
        let (store, namespace) = (self.clone(), namespace.to_owned());
        let claim = async move {
            match store.pre_claim(conn, &namespace, keys, secs).await {
                Ok(claimed) => Some(claimed),
                Err(err) => {
                    tracing::debug!(namespace, error = %err,
                        "a read's claim failed; its batches claim for themselves");
                    None
                }
            }
        }
        .boxed()
        .shared();
        // Driven to the end whoever waits for it.
        runtime.spawn(claim.clone());
        Ok(PendingClaim(claim))
    }

    /// A read of its own (keys the database cannot store fail alone); with
    /// `batch`, when it missed a key its connection is offered to the claim
    /// that follows.
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
        let mut kept = None;
        let mut then = |store: &PgStore, mut conn: Conn, looked: &Result<Vec<Lookup<V>>, Error>| {
            match looked {
                Ok(looked)
                    if batch
                        && looked.iter().any(|lookup| {
                            !matches!(lookup, Lookup::Hit(_) | Lookup::NegativeHit)
                        }) =>
                {
                    conn.finish(true);
                    kept = Some(conn);
                }
                _ => store.done_with(conn, looked),
            }
        };
        let looked: Vec<Lookup<V>> = on_conn!(
            &Laned(self),
            "reading cache rows",
            Duration::ZERO,
            None,
            then then,
            |conn| async {
                let rows = self.select_rows(conn, namespace, keys, grace).await?;
                Ok(self.lookups(rows, namespace, keys))
            }
        )?;
        let Some(conn) = kept else {
            return Ok(looked);
        };
        // Missed keys: claimed here when all are claimable (see
        // `preclaim`), or else the connection goes on to the batch's claim.
        let claimable = looked
            .iter()
            .all(|lookup| matches!(lookup, Lookup::Hit(_) | Lookup::NegativeHit | Lookup::Miss));
        let handed = if claimable && self.fill_mode() == FillMode::Lease {
            let missed = keys
                .iter()
                .zip(&looked)
                .filter(|(_, lookup)| matches!(lookup, Lookup::Miss))
                .map(|(&key, _)| key)
                .collect();
            self.claim_for_read(conn, namespace, &[missed])
        } else {
            Err(conn)
        };
        match handed {
            Ok(claim) => crate::handoff::offer(self.id(), claim),
            Err(conn) => crate::handoff::offer(self.id(), conn),
        }
        Ok(looked)
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
        self.inner
            .sql
            .select_fresh
            .query()
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
/// expires_at`): a hit, a negative entry (NULL), or undecodable — a value
/// that does not decode into `V`, or metadata that does not read (a
/// negative version, a time out of range), which is never replaced by a
/// default: version 0 means "primed", and the epoch would make the entry
/// look expired, or fresh for ever.
fn decode_value<V: serde::de::DeserializeOwned>(
    row: &PgRow,
    namespace: &str,
    key: &str,
) -> Lookup<V> {
    let undecodable = |what: &dyn std::fmt::Display| {
        tracing::warn!(
            namespace,
            key,
            error = %what,
            "cached row does not decode; fetching it again"
        );
        Lookup::Undecodable
    };
    let fresh = match row.try_get::<bool, _>(2) {
        Ok(fresh) => fresh,
        Err(err) => return undecodable(&err),
    };
    match row.try_get::<Option<Json<V>>, _>(1) {
        Ok(Some(Json(value))) => match row_meta(row, 3) {
            Ok((version, fetched_at, expires_at)) => {
                let entry = Entry::new(value, version, fetched_at, expires_at);
                if fresh {
                    Lookup::Hit(entry)
                } else {
                    Lookup::Stale(entry)
                }
            }
            Err(err) => undecodable(&err),
        },
        Ok(None) if fresh => Lookup::NegativeHit,
        Ok(None) => Lookup::Miss,
        Err(err) => undecodable(&err),
    }
}

/// Reads `version, fetched_at, expires_at` (the times as epoch seconds)
/// from the columns starting at `first`; an error names what does not
/// read.
pub(super) fn row_meta(row: &PgRow, first: usize) -> Result<(u64, SystemTime, SystemTime), String> {
    let version = row
        .try_get::<i64, _>(first)
        .map_err(|e| e.to_string())
        .and_then(|v| u64::try_from(v).map_err(|_| format!("negative version {v}")))?;
    let time = |i: usize, name: &str| {
        let seconds = row.try_get::<f64, _>(i).map_err(|e| e.to_string())?;
        Duration::try_from_secs_f64(seconds)
            .ok()
            .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
            .ok_or_else(|| format!("{name} {seconds} is not a time"))
    };
    Ok((
        version,
        time(first + 1, "fetched_at")?,
        time(first + 2, "expires_at")?,
    ))
}
