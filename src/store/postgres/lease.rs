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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::combine::{self, Member};
use super::conn::{Conn, Laned};
use super::preclaim::{PendingClaim, PreClaimed};
use super::read::Ticket;
use super::rows::{Encoded, Written};
use super::shared::{OpenedCall, Sharing};
use super::store::pg_millis;
use super::PgStore;
use crate::store::{lock_id, namespace_lock_id, Fill, Filled, Lookup};
use crate::{BatchFetch, Error};

/// A lease's margin over the longest its fetch may take: a fixed part for
/// the round trips around the fetch, and a tenth for clock drift.
const LEASE_MARGIN: Duration = Duration::from_secs(2);

/// How soon a fill waiting for another holder looks again when no
/// notification comes: while the listener is not listening (it may be
/// connecting), the first time, then doubling up to [`MAX_POLL`]; while it
/// listens (every publish is heard), [`MAX_POLL`] at once.
const POLL: Duration = Duration::from_millis(50);
const MAX_POLL: Duration = Duration::from_secs(1);

/// How long a fill waits before it tries again the keys whose locks a
/// combined claim found busy (the holder is most likely another claim,
/// which holds them for one statement), unless a publish of them wakes it.
const LOCK_BUSY_WAIT: Duration = Duration::from_millis(5);

/// How many times a key's lock is tried before its fill waits for it
/// (bounded by the lock timeout) with the waiting claim.
const LOCK_TRIES: u32 = 3;

/// Rounds of claims one fill makes before it gives up: a round ends when
/// every key was fetched, found, or found leased by another and waited for.
const MAX_ROUNDS: u32 = 64;

/// How many times one fill accepts losing its leases (revoked by
/// invalidations while it fetched) before it fails with
/// [`Error::Contended`].
const MAX_REVOKED: u32 = 8;

/// The lease a fetch bounded by `fetch` needs.
pub(super) fn lease_for(fetch: Duration) -> Duration {
    crate::store::lease_covering(fetch, LEASE_MARGIN)
}

/// The longest fetch a lease of at most `max_lease` covers.
pub(super) fn longest_covered_fetch(max_lease: Duration) -> Duration {
    max_lease.saturating_sub(LEASE_MARGIN) * 10 / 11
}

/// What a claim answered for one key.
#[derive(Clone, Copy)]
pub(super) enum Claimed {
    /// A fresh row (a value or a negative entry): re-read by the fill.
    Found,
    /// Leased by this claim.
    Leased,
    /// Leased by a live holder, for this long still.
    Busy(Duration),
    /// Not looked at: its lock was busy (a combined claim only tries
    /// locks); the fill tries it again shortly, and after
    /// [`LOCK_TRIES`] such answers claims it waiting for the lock.
    LockBusy,
}

/// What a claim answers: the lease token, how many leases it took over,
/// each key's state, and the token's call, when it opened one for other
/// fills to join (see `shared`).
pub(super) type ClaimAnswer = (i64, usize, Vec<Claimed>, Option<OpenedCall>);

/// A claim's rows as read: the lease token, each key's state and whether
/// its lease was taken over, and the token's call, when it opened one.
type ClaimRows = (i64, Vec<(Claimed, bool)>, Option<OpenedCall>);

/// One fill's part of a combined claim: its keys (distinct) and the
/// length of their lease, in seconds.
pub(super) struct ClaimRequest {
    keys: Vec<String>,
    lease: f64,
}

/// One fill's part of a combined publish: its keys (sorted, distinct),
/// their values (`None`: a negative entry) and its lease token.
pub(super) struct PublishRequest {
    keys: Vec<String>,
    values: Vec<Option<String>>,
    token: i64,
}

/// What the fills of a combined publish share: the namespace and the
/// times to live.
pub(super) type PublishGroup = (String, Duration, Duration);

/// The leases of one claim, on keys sorted as rows are locked; dropping it
/// before [`settled`](Held::settled) (a cancelled fill) releases them in
/// the background, so waiters are not held until expiry.
pub(super) struct Held {
    store: PgStore,
    pub(super) namespace: String,
    pub(super) token: i64,
    /// Sorted, distinct.
    pub(super) keys: Vec<String>,
    /// The call of this token the claim opened for other fills to join
    /// (see `shared`), which this fill has to close: at the call's turn (a
    /// [`Sharing`] takes that over), or when dropped. (The fills a claim
    /// answered share it: each closes it, the first for all.)
    call: Option<OpenedCall>,
}

impl Held {
    fn new(
        store: &PgStore,
        namespace: &str,
        token: i64,
        mut keys: Vec<String>,
        call: Option<OpenedCall>,
    ) -> Self {
        keys.sort_unstable();
        keys.dedup();
        Held {
            store: store.clone(),
            namespace: namespace.to_owned(),
            token,
            call: call.filter(|_| !keys.is_empty()),
            keys,
        }
    }

    /// Hands the closing of the call this fill's claim opened to the
    /// caller (a [`Sharing`]); `None` when there is none to close.
    pub(super) fn take_call(&mut self) -> Option<OpenedCall> {
        self.call.take()
    }

    fn settled(mut self) {
        self.keys.clear();
    }

    /// Adds keys leased to this token by others' claims (a shared call).
    pub(super) fn carry(&mut self, keys: impl IntoIterator<Item = String>) {
        self.keys.extend(keys);
        self.keys.sort_unstable();
        self.keys.dedup();
    }

    /// Releases the leases now, waking their waiters.
    async fn release(mut self) -> Result<(), Error> {
        let keys = std::mem::take(&mut self.keys);
        self.store.release(&self.namespace, &keys, self.token).await
    }
}

impl Drop for Held {
    /// Releases the leases not settled (a cancelled or failed fill), and
    /// closes the call its claim opened if nobody did, releasing what
    /// joined it: in the background, waking their waiters.
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.keys);
        if keys.is_empty() && self.call.is_none() {
            return;
        }
        self.store.release_in_background(
            std::mem::take(&mut self.namespace),
            self.token,
            self.call.take(),
            keys,
            "the leases of a cancelled fill",
        );
    }
}

/// Renews a fetch's leases in the background until dropped.
pub(super) struct Renewal(tokio::task::JoinHandle<()>);

impl Drop for Renewal {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl PgStore {
    /// A fill under leases; with `try_only` (a background refresh), gives up
    /// (`None`, releasing what it leased) when any key is found or leased by
    /// someone else.
    ///
    /// A fill that fails after some of its keys were published answers
    /// those (and whatever it found in the store) and fails only the rest,
    /// each [`Filled::Failed`].
    pub(super) async fn fill_leased<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        try_only: bool,
    ) -> Result<Option<Vec<Filled<F::Value>>>, Error> {
        let mut answers: Vec<Option<Filled<F::Value>>> =
            (0..fill.keys().len()).map(|_| None).collect();
        let rounds = self.lease_rounds(fill, try_only, &mut answers).await;
        crate::store::fill_answers(rounds, answers, try_only)
    }

    /// The rounds of a leased fill, answering into `answers` as keys settle;
    /// `Ok(false)` when a `try_only` fill gave up (releasing what it
    /// leased).
    async fn lease_rounds<F: BatchFetch>(
        &self,
        fill: &Fill<'_, F>,
        try_only: bool,
        answers: &mut [Option<Filled<F::Value>>],
    ) -> Result<bool, Error> {
        let namespace = fill.namespace();
        let texts: Vec<String> = fill.keys().iter().map(ToString::to_string).collect();
        let group_size = self.lease_group_size(fill);
        let max_batch = fill.max_batch_size().max(1);
        let shares = texts
            .first()
            .is_some_and(|sample| fill.shares_calls(sample));
        self.inner.learned.record(
            namespace,
            max_batch,
            group_size,
            shares,
            shares && fill.fleet_binds(),
            |calls| lease_for(fill.fetch_bound(calls.saturating_mul(max_batch))),
        );
        // What the batch's read claimed for it, as the first round's claim:
        // taken (and the rest of the read's answer let go of) before
        // anything here waits, so leases this fill does not take are
        // released for whoever waits for them.
        let mut pre_claimed: Option<ClaimAnswer> = None;
        // The waiters' epoch before the read's claim was sent: a publish of
        // a key it answered busy may come before this fill waits for it.
        let mut pre_epoch = None;
        let pending = crate::handoff::take::<PendingClaim>(self.id());
        if let Some(pre) = match pending {
            Some(PendingClaim(claim)) => claim.await,
            None => None,
        } {
            let keys: Vec<&str> = texts.iter().map(String::as_str).collect();
            pre_claimed = pre.answer(namespace, &keys);
            pre_epoch = pre_claimed.is_some().then(|| pre.epoch());
        }
        let waiters = &self.inner.waiters;
        let mut pending: Vec<usize> = (0..texts.len()).collect();
        let mut revoked_rounds = 0;
        let mut poll = POLL;
        // Keys whose locks a combined claim found busy, and how often: tried
        // again after a short wait, then claimed waiting for the locks.
        let mut locks_busy: HashMap<usize, u32> = HashMap::new();
        // Listening from the first fill on, so that a wait for another
        // holder is woken by its publish rather than by the poll.
        let _ = self.events();
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return Ok(true);
            }
            // Read before claiming: the registration below is told of the
            // wake-ups between the claim and itself.
            let epoch = pre_epoch.take().unwrap_or_else(|| waiters.epoch());
            let mut next = Vec::new();
            let mut recheck = Vec::new();
            let mut busy = Vec::new();
            let mut busy_for: Option<Duration> = None;
            let mut tried_busy = Vec::new();
            let mut revoked = false;
            for group in pending.chunks(group_size) {
                let group_texts: Vec<&str> = group.iter().map(|&i| texts[i].as_str()).collect();
                let lease = lease_for(fill.fetch_bound(group.len()));
                let started = Instant::now();
                let wait_for_locks = group
                    .iter()
                    .any(|i| locks_busy.get(i).is_some_and(|&n| n >= LOCK_TRIES));
                let (token, taken_over, claimed, opened) =
                    if let Some((token, taken_over, states, opened)) = &mut pre_claimed {
                        // Aligned with the fill's keys, each in one group.
                        let claimed = group.iter().map(|&i| states[i]).collect();
                        (*token, std::mem::take(taken_over), claimed, opened.clone())
                    } else if wait_for_locks {
                        self.claim(namespace, &group_texts, lease).await?
                    } else {
                        self.claim_tried(namespace, &group_texts, lease).await?
                    };
                fill.record_lock_wait(started.elapsed());
                fill.record_takeovers(taken_over);
                let mut leased = Vec::new();
                for (&i, claimed) in group.iter().zip(claimed) {
                    match claimed {
                        Claimed::Leased => leased.push(i),
                        Claimed::Found => recheck.push(i),
                        Claimed::Busy(left) => {
                            busy_for = Some(busy_for.map_or(left, |b| b.min(left)));
                            busy.push(i);
                            recheck.push(i);
                        }
                        Claimed::LockBusy => {
                            *locks_busy.entry(i).or_default() += 1;
                            tried_busy.push(i);
                            next.push(i);
                        }
                    }
                }
                let held = Held::new(
                    self,
                    namespace,
                    token,
                    leased.iter().map(|&i| texts[i].clone()).collect(),
                    opened,
                );
                if try_only && leased.len() < group.len() {
                    drop(held);
                    return Ok(false);
                }
                if leased.is_empty() {
                    held.settled();
                    continue;
                }
                let lost = self
                    .fetch_and_publish(fill, &texts, &leased, held, lease, answers)
                    .await?;
                if !lost.is_empty() {
                    revoked = true;
                    fill.record_revoked(lost.len());
                    next.extend(lost);
                }
            }
            // Only the first round's claims were made by the read.
            pre_claimed = None;
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
            if busy_for.is_some() || !tried_busy.is_empty() {
                fill.record_lease_wait(busy.len());
                let registration = waiters.register(
                    namespace,
                    busy.iter().chain(&tried_busy).map(|&i| texts[i].as_str()),
                    epoch,
                );
                // Woken once every key's holder published (or released, or
                // the keys were invalidated), including what came since the
                // claim; keys whose locks were busy are tried again soon;
                // the poll covers a listener that is (re)connecting, the
                // lease's expiry a holder that died.
                match busy_for.filter(|_| tried_busy.is_empty()) {
                    Some(left) => tokio::select! {
                        () = registration.woken() => {}
                        () = tokio::time::sleep(
                            if waiters.listening() { MAX_POLL } else { poll }
                                .min(left + Duration::from_millis(5)),
                        ) => {
                            poll = (poll * 2).min(MAX_POLL);
                        }
                    },
                    None => tokio::select! {
                        () = registration.woken() => {}
                        () = tokio::time::sleep(LOCK_BUSY_WAIT) => {}
                    },
                }
            }
            if !recheck.is_empty() {
                // Leave first, then read: whoever joins from now on reads
                // the store itself, so nobody receives a value read before
                // it joined.
                fill.about_to_commit(&recheck);
                let keys: Vec<String> = recheck.iter().map(|&i| texts[i].clone()).collect();
                let looked = self
                    .read::<F::Value>(namespace, keys, Duration::ZERO)
                    .await?;
                for (&i, lookup) in recheck.iter().zip(looked) {
                    match lookup {
                        Lookup::Hit(entry) => answers[i] = Some(Filled::Stored(Some(entry))),
                        Lookup::NegativeHit => answers[i] = Some(Filled::Stored(None)),
                        Lookup::Undecodable => {
                            // Fresh but unreadable: made a miss (a
                            // tombstone), then claimed again.
                            self.invalidate_group(namespace, &texts[i..=i], None)
                                .await?;
                            next.push(i);
                        }
                        _ => next.push(i),
                    }
                }
            }
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
        mut held: Held,
        lease: Duration,
        answers: &mut [Option<Filled<F::Value>>],
    ) -> Result<Vec<usize>, Error> {
        let namespace = fill.namespace();
        let keys: Vec<F::Key> = leased.iter().map(|&i| fill.keys()[i].clone()).collect();
        let renewal =
            self.renew_until_dropped(&held.namespace, held.keys.clone(), held.token, lease);
        // Until its turn of a fleet budget, the call its claim opened may
        // carry keys other fills joined to it (see `shared`): published
        // here with the fill's own.
        let sharing = Sharing::new(self, fill, &mut held, lease);
        let fetched = match &sharing {
            Some(sharing) => fill.fetch_each_shared(&keys, sharing).await,
            None => fill.fetch_each(&keys).await,
        };
        drop(renewal);
        let (carried, carried_answers) = sharing.as_ref().map(Sharing::take).unwrap_or_default();
        drop(sharing);
        held.carry(carried.iter().map(|(text, _)| text.clone()));
        let fetched = match fetched {
            Ok(fetched) => fetched,
            Err(err) => return Err(Self::failed(held, err).await),
        };
        // The carried keys' answers, as rows (a value's JSON, or `None` for
        // a negative entry); a key the provider failed alone (or the whole
        // call) is released.
        let mut carried_rows: Vec<(&str, Option<String>)> = Vec::with_capacity(carried.len());
        let mut dropped: Vec<String> = Vec::new();
        match carried_answers {
            Some(Ok(mut answers)) => {
                for (text, key) in &carried {
                    match answers.remove(key) {
                        Some(Err(_)) => dropped.push(text.clone()),
                        Some(Ok(value)) => match serde_json::to_string(&value) {
                            Ok(json) => carried_rows.push((text, Some(json))),
                            Err(_) => dropped.push(text.clone()),
                        },
                        None => carried_rows.push((text, None)),
                    }
                }
            }
            _ => dropped.extend(carried.iter().map(|(text, _)| text.clone())),
        }
        let answered = crate::store::answer_failed(fetched, leased, keys, answers);
        // Keys the provider failed alone: nothing written, and their leases
        // released at once so that waiters claim them instead of waiting
        // for the expiry.
        dropped.extend(answered.failed.iter().map(|&i| texts[i].clone()));
        if !dropped.is_empty() {
            dropped.sort_unstable();
            if let Err(release) = self.release(namespace, &dropped, held.token).await {
                tracing::warn!(namespace, error = %release,
                    "could not release the leases of failed keys; they expire on their own");
            }
        }
        if answered.indices.is_empty() && carried_rows.is_empty() {
            held.settled();
            return Ok(Vec::new());
        }
        let leased = &answered.indices[..];
        let mut rows = Encoded::new(texts, leased, &answered.keys, answered.values)?;
        rows.carry(carried_rows);
        // Joiners from now on read the store: the publish is what they see.
        fill.about_to_commit(leased);
        let published: Vec<String> = rows.keys.iter().map(|&key| key.to_owned()).collect();
        let request = PublishRequest {
            keys: published,
            values: std::mem::take(&mut rows.values),
            token: held.token,
        };
        let group = (namespace.to_owned(), fill.ttl(), fill.negative_ttl());
        let written = self.publish(group, request).await;
        held.settled();
        // Fills of this process waiting for these keys need no notification
        // from the server.
        self.inner
            .waiters
            .wake_keys(namespace, rows.keys.iter().copied());
        Ok(rows.settle(written?, answers))
    }

    /// A fill whose provider call (or its budget) failed with `err`:
    /// releases its leases at once, so waiters claim the keys themselves
    /// instead of waiting for the leases to expire; returns `err`.
    async fn failed(held: Held, err: Error) -> Error {
        let namespace = held.namespace.clone();
        if let Err(release) = held.release().await {
            tracing::warn!(namespace, error = %release,
                "could not release the leases of a failed fill; they expire on their own");
        }
        err
    }

    /// A claim that only tries the keys' locks (a key whose lock is busy is
    /// [`Claimed::LockBusy`]), combined with the claims of this store's
    /// other fills of the namespace that queue with it; answers as
    /// [`claim`](Self::claim).
    async fn claim_tried(
        &self,
        namespace: &str,
        keys: &[&str],
        lease: Duration,
    ) -> Result<ClaimAnswer, Error> {
        let request = ClaimRequest {
            keys: keys.iter().map(|&key| key.to_owned()).collect(),
            lease: lease.as_secs_f64(),
        };
        if !combine::storable(keys.iter().copied()) {
            let (member, answer) = combine::member(request);
            self.run_claims(namespace.to_owned(), None, vec![member])
                .await;
            return combine::answered(answer).await;
        }
        let namespace = namespace.to_owned();
        let joined = self.inner.claims.join(&namespace, request, keys.len());
        // The connection this batch's read left for its claim (or its ticket
        // to the connection of a combined read): the runner's, or (when this
        // claim joined a group) the next waiting statement's.
        let handed = crate::handoff::take::<Conn>(self.id());
        let ticket = crate::handoff::take::<Ticket>(self.id());
        if let Some(number) = joined.leads {
            let (store, abandoned) = (self.clone(), self.clone());
            let abandoned_namespace = namespace.clone();
            combine::spawn_runner(
                move || abandoned.inner.claims.abandon(&abandoned_namespace, number),
                crate::handoff::scope(async move {
                    let conn = match (handed, ticket) {
                        (Some(conn), _) => Some(conn),
                        // The others of the read join this claim meanwhile.
                        (None, Some(ticket)) => ticket.redeem().await,
                        (None, None) => None,
                    };
                    if let Some(conn) = conn {
                        crate::handoff::offer(store.id(), conn);
                    }
                    store.run_claims(namespace, Some(number), Vec::new()).await;
                }),
            );
        } else {
            // Back to the pool (a ticket: once the others let go too).
            drop((ticket, handed));
        }
        combine::answered(joined.answer).await
    }

    /// Runs the claims of `members` (or, with a `number`, of that group of
    /// `namespace` once a connection is at hand) as one statement and
    /// answers each.
    async fn run_claims(
        &self,
        namespace: String,
        number: Option<u64>,
        members: Vec<Member<ClaimRequest, ClaimAnswer>>,
    ) {
        let inner = &*self.inner;
        let mut members = members;
        // Each key once, with the lease of the first fill asking for it.
        let mut keys: Vec<String> = Vec::new();
        let outcome = async {
            on_conn!(
                &Laned(self),
                "claiming keys",
                Duration::ZERO,
                None,
                |conn| {
                    if let Some(number) = number {
                        members = inner.claims.close(&namespace, number);
                    }
                    let mut seen = HashSet::new();
                    let mut secs = Vec::new();
                    for member in &members {
                        for key in &member.request.keys {
                            if seen.insert(key.as_str()) {
                                keys.push(key.clone());
                                secs.push(member.request.lease);
                            }
                        }
                    }
                    let (keys, namespace) = (&keys, &namespace);
                    async move { self.send_claim_tried(conn, namespace, keys, &secs).await }
                }
            )
        }
        .await;
        if let Some(number) = number.filter(|_| members.is_empty()) {
            members = inner.claims.close(&namespace, number);
        }
        let answered = outcome.and_then(|rows| self.claim_rows(keys.len(), rows));
        let (token, states, opened) = match answered {
            Ok(answered) => answered,
            Err(err) => {
                for member in members {
                    member.answer(Err(err.clone()));
                }
                return;
            }
        };
        let position: HashMap<&str, usize> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| (key.as_str(), i))
            .collect();
        // A key two fills asked for is leased to the first only; the other
        // waits for its publish as for any other holder's.
        let mut answered_once = vec![false; keys.len()];
        for member in members {
            let mut taken_over = 0;
            let mut claimed = Vec::with_capacity(member.request.keys.len());
            for key in &member.request.keys {
                let Some(&i) = position.get(key.as_str()) else {
                    claimed.push(Claimed::LockBusy);
                    continue;
                };
                let (state, took_over) = states[i];
                let first = !std::mem::replace(&mut answered_once[i], true);
                claimed.push(match state {
                    Claimed::Leased if !first => {
                        Claimed::Busy(Duration::from_secs_f64(member.request.lease))
                    }
                    state => {
                        taken_over += usize::from(first && took_over);
                        state
                    }
                });
            }
            member.answer(Ok((token, taken_over, claimed, opened.clone())));
        }
    }

    /// The claim a batch's read makes on its own connection `conn` for the
    /// keys (distinct) it found no value for, each leased for as many
    /// seconds as `secs` says, for the fills of its batches (see
    /// `preclaim`): the statement a fill's claim would have sent, which
    /// only tries locks.
    pub(super) async fn pre_claim(
        &self,
        conn: Conn,
        namespace: &str,
        keys: Vec<String>,
        secs: Vec<f64>,
    ) -> Result<Arc<PreClaimed>, Error> {
        let epoch = self.inner.waiters.epoch();
        let rows: Vec<PgRow> = crate::handoff::scope(async {
            // The statement takes the read's connection, in its lane.
            crate::handoff::offer(self.id(), conn);
            on_conn!(
                &Laned(self),
                "claiming keys",
                Duration::ZERO,
                None,
                |conn| self.send_claim_tried(conn, namespace, &keys, &secs)
            )
        })
        .await?;
        let (token, states, opened) = self.claim_rows(keys.len(), rows)?;
        Ok(PreClaimed::new(
            self, namespace, keys, token, epoch, states, opened,
        ))
    }

    /// The claim statement that only tries locks (`_claim_tried`), of
    /// `keys` (distinct) of `namespace`, each leased for as many seconds as
    /// `secs` says, on `conn`: one round trip.
    async fn send_claim_tried(
        &self,
        conn: &mut sqlx::PgConnection,
        namespace: &str,
        keys: &[String],
        secs: &[f64],
    ) -> Result<Vec<PgRow>, sqlx::Error> {
        let inner = &*self.inner;
        let ids: Vec<i64> = keys.iter().map(|key| lock_id(namespace, key)).collect();
        self.count_round_trips(1);
        inner
            .sql
            .claim_tried
            .query()
            .bind(namespace)
            .bind(keys)
            .bind(ids)
            .bind(namespace_lock_id(namespace))
            .bind(&inner.holder)
            .bind(secs)
            .bind(self.call_room(namespace))
            .fetch_all(conn)
            .await
    }

    /// The room of a call a claim of `namespace` opens for other fills to
    /// join (see `shared`): 0, none opened, unless the namespace's latest
    /// fill told that its calls are shared and its budget binds.
    fn call_room(&self, namespace: &str) -> i32 {
        self.inner
            .learned
            .get(namespace)
            .map_or(0, |terms| terms.call_room())
    }

    /// Reads the rows of a claim of `expected` keys: the token, per key its
    /// state and whether its lease was taken over, and the token's call
    /// when the claim opened it (its own leases answered 'o', not 'l').
    fn claim_rows(&self, expected: usize, rows: Vec<PgRow>) -> Result<ClaimRows, Error> {
        if rows.len() != expected {
            return Err(Error::Store {
                message: format!("a claim of {expected} keys answered {}", rows.len()).into(),
                source: None,
            });
        }
        let mut token = 0;
        let mut opened = false;
        let mut states = Vec::with_capacity(rows.len());
        for row in rows {
            let read = |e| self.error("reading a claim", e);
            let state: &str = row.try_get(0).map_err(read)?;
            token = row.try_get(1).map_err(read)?;
            let taken_over = row.try_get::<i64, _>(3).map_err(read)? != 0;
            states.push((
                match state {
                    "l" => Claimed::Leased,
                    "o" => {
                        opened = true;
                        Claimed::Leased
                    }
                    "f" => Claimed::Found,
                    "u" => Claimed::LockBusy,
                    _ => {
                        let left = row.try_get::<Option<f64>, _>(2).map_err(read)?;
                        let left = Duration::try_from_secs_f64(left.unwrap_or(0.0).max(0.0));
                        Claimed::Busy(left.unwrap_or_default())
                    }
                },
                taken_over,
            ));
        }
        Ok((token, states, opened.then(|| OpenedCall::new(token))))
    }

    /// One claim: the keys' locks, the re-read and the leases, in one round
    /// trip; returns the lease token, the leases taken over, and each key's
    /// state, aligned with `keys`.
    async fn claim(
        &self,
        namespace: &str,
        keys: &[&str],
        lease: Duration,
    ) -> Result<ClaimAnswer, Error> {
        let inner = &*self.inner;
        let ids: Vec<i64> = keys.iter().map(|key| lock_id(namespace, key)).collect();
        let budget = inner.lock_timeout;
        self.count_round_trips(1);
        let rows: Vec<PgRow> = on_conn!(
            self,
            "claiming keys",
            budget,
            Some((namespace, keys.len())),
            |conn| inner
                .sql
                .claim
                .query()
                .bind(namespace)
                .bind(keys)
                .bind(&ids)
                .bind(namespace_lock_id(namespace))
                .bind(&inner.holder)
                .bind(lease.as_secs_f64())
                .bind(budget.as_secs_f64())
                .bind(self.call_room(namespace))
                .fetch_all(conn)
        )?;
        let (token, states, opened) = self.claim_rows(keys.len(), rows)?;
        let taken_over = states.iter().filter(|(_, took_over)| *took_over).count();
        Ok((
            token,
            taken_over,
            states.into_iter().map(|(state, _)| state).collect(),
            opened,
        ))
    }

    /// A fill's publish, with the publishes of this store's other fills of
    /// the namespace (and times to live) that queue with it; returns the
    /// rows written for it: its keys whose lease was still its token's.
    async fn publish(
        &self,
        group: PublishGroup,
        request: PublishRequest,
    ) -> Result<Vec<Written>, Error> {
        let alone = !combine::storable(request.keys.iter().map(String::as_str))
            || !combine::storable(request.values.iter().flatten().map(String::as_str));
        if alone {
            let (member, answer) = combine::member(request);
            self.run_publishes(group, None, vec![member]).await;
            return combine::answered(answer).await;
        }
        let keys = request.keys.len();
        let joined = self.inner.publishes.join(&group, request, keys);
        if let Some(number) = joined.leads {
            let (store, abandoned) = (self.clone(), self.clone());
            let abandoned_group = group.clone();
            combine::spawn_runner(
                move || abandoned.inner.publishes.abandon(&abandoned_group, number),
                async move { store.run_publishes(group, Some(number), Vec::new()).await },
            );
        }
        combine::answered(joined.answer).await
    }

    /// Runs the publishes of `members` (or, with a `number`, of that group
    /// of `group`, which others join while the connection is awaited) as
    /// one statement and answers each.
    async fn run_publishes(
        &self,
        group: PublishGroup,
        number: Option<u64>,
        members: Vec<Member<PublishRequest, Vec<Written>>>,
    ) {
        let inner = &*self.inner;
        let mut members = members;
        let (namespace, ttl, negative_ttl) = &group;
        let outcome = async {
            on_conn!(
                &Laned(self),
                "publishing fetched values",
                inner.lock_timeout,
                None,
                |conn| {
                    if let Some(number) = number {
                        members = inner.publishes.close(&group, number);
                    }
                    let mut rows: Vec<(&str, Option<&str>, i64)> = members
                        .iter()
                        .flat_map(|m| {
                            let r = &m.request;
                            r.keys
                                .iter()
                                .zip(&r.values)
                                .map(|(k, v)| (k.as_str(), v.as_deref(), r.token))
                        })
                        .collect();
                    rows.sort_unstable_by(|a, b| (a.0, a.2).cmp(&(b.0, b.2)));
                    let keys: Vec<&str> = rows.iter().map(|r| r.0).collect();
                    let values: Vec<Option<&str>> = rows.iter().map(|r| r.1).collect();
                    let tokens: Vec<i64> = rows.iter().map(|r| r.2).collect();
                    self.count_round_trips(1);
                    async move {
                        inner
                            .sql
                            .publish_many
                            .query()
                            .bind(namespace)
                            .bind(keys)
                            .bind(values)
                            .bind(tokens)
                            .bind(ttl.as_secs_f64())
                            .bind(negative_ttl.as_secs_f64())
                            .bind(&inner.channel)
                            .bind(pg_millis(inner.lock_timeout))
                            .fetch_all(conn)
                            .await
                    }
                }
            )
        }
        .await;
        if let Some(number) = number.filter(|_| members.is_empty()) {
            // The connection never came: whoever joined meanwhile shares
            // the error.
            members = inner.publishes.close(&group, number);
        }
        let rows = match outcome {
            Ok(rows) => rows,
            Err(err) => {
                for member in members {
                    member.answer(Err(err.clone()));
                }
                return;
            }
        };
        let mut by_token: HashMap<i64, Vec<Written>> = HashMap::new();
        for row in &rows {
            let (Some(written), Ok(token)) = (Written::from_row(row, 2), row.try_get::<i64, _>(1))
            else {
                continue;
            };
            by_token.entry(token).or_default().push(written);
        }
        for member in members {
            let mine: HashSet<&str> = member.request.keys.iter().map(String::as_str).collect();
            let written = by_token
                .get_mut(&member.request.token)
                .map(|rows| {
                    let (taken, kept): (Vec<Written>, Vec<Written>) = std::mem::take(rows)
                        .into_iter()
                        .partition(|w| mine.contains(w.key.as_str()));
                    *rows = kept;
                    taken
                })
                .unwrap_or_default();
            member.answer(Ok(written));
        }
    }

    /// Keeps the leases of `keys` (sorted) by `token` alive while their
    /// fetch runs (until the returned guard is dropped): a fill's own, or
    /// those a shared call carries once it closed. Every half lease, the
    /// keys still leased by `token` are leased for a whole `lease` from
    /// then on. A fetch may wait for rate-limit budget for longer than any
    /// lease, and the lease must outlive it; a holder that died or hung
    /// stops renewing, and its leases expire.
    pub(super) fn renew_until_dropped(
        &self,
        namespace: &str,
        keys: Vec<String>,
        token: i64,
        lease: Duration,
    ) -> Renewal {
        let (store, namespace) = (self.clone(), namespace.to_owned());
        Renewal(tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 2).await;
                if let Err(err) = store.renew(&namespace, &keys, token, lease).await {
                    tracing::warn!(namespace, error = %err,
                        "could not renew the leases of a fetch; trying again");
                }
            }
        }))
    }

    /// One renewal: the keys (sorted) still leased by `token`, leased for
    /// `lease` from now on.
    async fn renew(
        &self,
        namespace: &str,
        keys: &[String],
        token: i64,
        lease: Duration,
    ) -> Result<(), Error> {
        let inner = &*self.inner;
        self.count_round_trips(1);
        on_conn!(self, "renewing leases", inner.lock_timeout, None, |conn| {
            inner
                .sql
                .renew
                .query()
                .bind(namespace)
                .bind(keys)
                .bind(token)
                .bind(lease.as_secs_f64())
                .execute(conn)
        })?;
        Ok(())
    }

    /// Releases the leases of `token` on `keys`, in a task of its own (for
    /// a drop, which cannot wait), waking their waiters; with `call` (the
    /// call of `token`, see `shared`), first closes it and releases the
    /// keys that joined it too. `what` names them in the warning if that fails (they
    /// then expire). Outside a runtime nothing is released: they expire.
    pub(super) fn release_in_background(
        &self,
        namespace: String,
        token: i64,
        call: Option<OpenedCall>,
        mut keys: Vec<String>,
        what: &'static str,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let store = self.clone();
        runtime.spawn(async move {
            if let Some(call) = call {
                match store.close_call(&call).await {
                    Ok(joined) => keys.extend(joined),
                    Err(err) => tracing::warn!(namespace, error = %err,
                        "could not close a call; what joined it expires on its own"),
                }
            }
            if keys.is_empty() {
                return;
            }
            keys.sort_unstable();
            keys.dedup();
            if let Err(err) = store.release(&namespace, &keys, token).await {
                tracing::warn!(namespace, error = %err,
                    "could not release {what}; they expire on their own");
            }
        });
    }

    /// Gives up the leases `token` holds on `keys` (sorted: rows are locked
    /// in key order), waking their waiters.
    pub(super) async fn release(
        &self,
        namespace: &str,
        keys: &[String],
        token: i64,
    ) -> Result<(), Error> {
        let inner = &*self.inner;
        self.count_round_trips(1);
        on_conn!(
            &Laned(self),
            "releasing leases",
            inner.lock_timeout,
            None,
            |conn| {
                inner
                    .sql
                    .release
                    .query()
                    .bind(namespace)
                    .bind(keys)
                    .bind(token)
                    .bind(&inner.channel)
                    .bind(pg_millis(inner.lock_timeout))
                    .execute(conn)
            }
        )?;
        self.inner
            .waiters
            .wake_keys(namespace, keys.iter().map(String::as_str));
        Ok(())
    }
}
