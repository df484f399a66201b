//! Claims made right after a batch's optimistic read, by the read itself.
//!
//! A batch that missed keys claims them next. Left to the batch, the claim
//! waits for the batch's task to wake, sort the read's answer and register
//! its flights — and the connection the read used waits with it, idle, in
//! its lane. So once a namespace has had a fill (which tells the store how
//! long its leases must be), the read claims the keys it found no value for
//! (no row, a tombstone, an expired negative entry) at once, on its own connection, in the claim statement a fill would
//! have sent (`_claim_tried`: locks only tried, nothing waited for), in a
//! task of its own; the batches receive the read's rows meanwhile, and
//! their fills wait for the claim's answer. The read itself stays the
//! statement it was: no lock, no transaction, and nothing it found waits
//! for the claim; the claim is a statement and a transaction of its own,
//! after it.
//!
//! What it guarantees:
//!
//! * **The same claim, earlier.** A fill uses the answer as it would have
//!   used its own claim's: a key leased to it is fetched under that lease
//!   (and published only where the lease is still its token's), a key
//!   leased by another holder is waited for, a fresh row is re-read, a key
//!   whose lock was busy is claimed again.
//! * **A lease is used by one fill.** The batches of one read share the
//!   answer; the first fill of this process to lead a leased key takes its
//!   lease, and a later fill of the same key (the first one already left
//!   the in-flight table) re-reads it instead.
//! * **Nothing is held for nobody.** Leases no fill takes (a batch joined
//!   another's fill of the key instead, or was dropped) are released as
//!   soon as every batch of the read let go of the answer, waking whoever
//!   waits for them; a holder that died lets them expire like any other.
//! * **Only keys with nothing to serve.** A batch that missed a key the
//!   read found a value for (a stale one, an undecodable one) claims for
//!   itself, as before, so a stale value a background refresh renews is
//!   never leased by the read.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::lease::{ClaimAnswer, Claimed};
use super::shared::OpenedCall;
use super::PgStore;

/// How a namespace's fills lease keys: the most keys one claim covers,
/// and the lease a claim of so many keys takes, which depends only on the
/// provider calls they make.
#[derive(Clone)]
pub(super) struct LeaseTerms {
    max_batch: usize,
    group_size: usize,
    /// Whether the fills' calls are shared by the fleet (see `shared`).
    shares: bool,
    /// Whether claims open calls now: the calls are shared and the fleet's
    /// budget binds, as the namespace's latest fill found it (shared by
    /// every copy).
    opening: Arc<AtomicBool>,
    /// At `k - 1`: the lease of a claim of `k` provider calls' keys.
    leases: Arc<[Duration]>,
}

impl LeaseTerms {
    /// The lease a fill would take for a claim of `keys` keys; `None` when
    /// they are more than one claim covers.
    pub(super) fn lease(&self, keys: usize) -> Option<Duration> {
        if keys == 0 || keys > self.group_size {
            return None;
        }
        self.leases.get(keys.div_ceil(self.max_batch) - 1).copied()
    }

    /// How many keys a call opened by a claim of these fills holds, its
    /// own and those that join it (see `shared`): 0 when claims open none
    /// now.
    pub(super) fn call_room(&self) -> i32 {
        match self.opening.load(Ordering::Relaxed) {
            true => i32::try_from(self.max_batch).unwrap_or(i32::MAX),
            false => 0,
        }
    }
}

/// What a namespace's fills told the store.
enum Known {
    Terms(LeaseTerms),
    /// Fills of the namespace lease differently (caches with other
    /// providers' settings share it): reads claim nothing for them.
    Conflicting,
}

/// How each namespace's fills lease keys, by namespace, as they told it.
#[derive(Default)]
pub(super) struct Learned(Mutex<HashMap<String, Known>>);

impl Learned {
    /// Records how a fill of `namespace` leases keys: at most `group_size`
    /// per claim, provider calls of at most `max_batch` keys, shared by
    /// the fleet or not (`shares`; opened to it now or not, `opening`,
    /// which implies `shares`), and `lease_of(k)` for a claim of `k`
    /// calls' keys.
    pub(super) fn record(
        &self,
        namespace: &str,
        max_batch: usize,
        group_size: usize,
        shares: bool,
        opening: bool,
        lease_of: impl Fn(usize) -> Duration,
    ) {
        let max_batch = max_batch.max(1);
        let calls = group_size.div_ceil(max_batch).max(1);
        let mut learned = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match learned.get(namespace) {
            // The same terms: only the ends are compared, each fill.
            Some(Known::Terms(known))
                if known.max_batch == max_batch
                    && known.group_size == group_size
                    && known.shares == shares
                    && known.leases.len() == calls
                    && known.leases.first() == Some(&lease_of(1))
                    && known.leases.last() == Some(&lease_of(calls)) =>
            {
                known.opening.store(opening, Ordering::Relaxed);
            }
            Some(Known::Conflicting) => {}
            Some(Known::Terms(_)) => {
                learned.insert(namespace.to_owned(), Known::Conflicting);
            }
            None => {
                let terms = LeaseTerms {
                    max_batch,
                    group_size,
                    shares,
                    opening: Arc::new(AtomicBool::new(opening)),
                    leases: (1..=calls).map(lease_of).collect(),
                };
                learned.insert(namespace.to_owned(), Known::Terms(terms));
            }
        }
    }

    /// How `namespace`'s fills lease keys, once one of them ran (and all
    /// that ran agreed).
    pub(super) fn get(&self, namespace: &str) -> Option<LeaseTerms> {
        let learned = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match learned.get(namespace) {
            Some(Known::Terms(terms)) => Some(terms.clone()),
            _ => None,
        }
    }
}

/// The claim a read started for its batches: its answer once made, `None`
/// when it failed (the fills then claim for themselves).
#[derive(Clone)]
pub(super) struct PendingClaim(
    pub(super) futures::future::Shared<futures::future::BoxFuture<'static, Option<Arc<PreClaimed>>>>,
);

/// A claim made for the batches of one read, shared by them.
pub(super) struct PreClaimed {
    store: PgStore,
    namespace: String,
    token: i64,
    /// The waiters' epoch before the claim was sent: a publish after it may
    /// have come before a fill that waits for a key answered busy starts
    /// waiting.
    epoch: u64,
    /// Each key's answer, and whether its lease was taken over; a key
    /// still answered as leased is one no fill has taken yet (a fill that
    /// takes it leaves it answered as found).
    states: Mutex<HashMap<String, (Claimed, bool)>>,
    /// The call the claim opened for other fills to join (see `shared`;
    /// a claim opens one only with leases of its own): a fill that takes
    /// any of its leased keys closes it, and if none does, the drop.
    call: Option<OpenedCall>,
    /// How many keys the claim leased.
    leased: usize,
}

impl PreClaimed {
    /// The answer of a claim of `keys` (distinct) in `namespace`, with the
    /// token's call if it opened one (see `shared`).
    pub(super) fn new(
        store: &PgStore,
        namespace: &str,
        keys: Vec<String>,
        token: i64,
        epoch: u64,
        states: Vec<(Claimed, bool)>,
        call: Option<OpenedCall>,
    ) -> Arc<Self> {
        let leased = states
            .iter()
            .filter(|(state, _)| matches!(state, Claimed::Leased))
            .count();
        Arc::new(PreClaimed {
            store: store.clone(),
            namespace: namespace.to_owned(),
            token,
            epoch,
            states: Mutex::new(keys.into_iter().zip(states).collect()),
            call,
            leased,
        })
    }

    /// The waiters' epoch before the claim was sent.
    pub(super) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The claim's answer for a fill of `keys` of `namespace`, as a claim
    /// of its own would answer (`None`: another namespace). A leased key is
    /// taken by this fill; one another fill took already, or one the claim
    /// did not cover, is answered as found, so the fill re-reads it (and
    /// claims it afresh if it is still missing).
    pub(super) fn answer(&self, namespace: &str, keys: &[&str]) -> Option<ClaimAnswer> {
        if namespace != self.namespace {
            return None;
        }
        let mut known = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken_over = 0;
        let states = keys
            .iter()
            .map(|&key| match known.get_mut(key) {
                Some((state @ Claimed::Leased, took_over)) => {
                    *state = Claimed::Found;
                    taken_over += usize::from(*took_over);
                    Claimed::Leased
                }
                Some((state, _)) => *state,
                None => Claimed::Found,
            })
            .collect();
        Some((self.token, taken_over, states, self.call.clone()))
    }
}

impl Drop for PreClaimed {
    /// Releases the leases no fill took, in the background, waking their
    /// waiters (a fill of this process that found one leased waits for
    /// it); when no fill took any, closes the call the claim opened and
    /// releases what joined it too.
    fn drop(&mut self) {
        let states = std::mem::take(self.states.get_mut().unwrap_or_else(|e| e.into_inner()));
        let keys: Vec<String> = states
            .into_iter()
            .filter(|(_, (state, _))| matches!(state, Claimed::Leased))
            .map(|(key, _)| key)
            .collect();
        if keys.is_empty() {
            return;
        }
        let call = self.call.take().filter(|_| keys.len() == self.leased);
        self.store.release_in_background(
            std::mem::take(&mut self.namespace),
            self.token,
            call,
            keys,
            "leases no fill took",
        );
    }
}
