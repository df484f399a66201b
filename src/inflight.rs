//! Tier 1: the process-wide in-flight table, and the one-shot [`Flight`] that
//! every waiter of a key's load awaits.
//!
//! A key being loaded by any loader of a cache has one entry here; a second
//! loader asking for it joins that entry's flight instead of loading it again.
//! Entries are removed by the leader's [`Lease`], whether the load settles,
//! fails, or the leader's task is torn down (drop guard).

use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::Error;

/// What a load of one key ends with: a value, "not found", or an error.
pub(crate) type Outcome<V> = Result<Option<V>, Error>;

/// The single result of one key's load, awaited by any number of waiters.
///
/// Completed exactly once; later completions are ignored.
#[derive(Debug)]
pub(crate) struct Flight<V> {
    outcome: OnceLock<Outcome<V>>,
    notify: Notify,
    /// Callers currently awaiting this flight through a [`Waiter`].
    waiters: AtomicUsize,
}

impl<V: Clone> Flight<V> {
    pub(crate) fn pending() -> Arc<Self> {
        Arc::new(Flight {
            outcome: OnceLock::new(),
            notify: Notify::new(),
            waiters: AtomicUsize::new(0),
        })
    }

    pub(crate) fn ready(value: Option<V>) -> Arc<Self> {
        let flight = Self::pending();
        let _ = flight.outcome.set(Ok(value));
        flight
    }

    /// Sets the outcome (if not set yet) and wakes every waiter.
    pub(crate) fn complete(&self, outcome: Outcome<V>) {
        if self.outcome.set(outcome).is_ok() {
            self.notify.notify_waiters();
        }
    }

    /// Whether the flight ended in an error: such a memo entry is stale and
    /// the key may be loaded (or primed) afresh.
    pub(crate) fn has_failed(&self) -> bool {
        matches!(self.outcome.get(), Some(Err(_)))
    }

    /// The outcome, once the flight completed.
    pub(crate) fn outcome(&self) -> Option<&Outcome<V>> {
        self.outcome.get()
    }

    pub(crate) fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Acquire)
    }

    /// Registers a caller; the count drops again when the [`Waiter`] does.
    pub(crate) fn waiter(self: &Arc<Self>) -> Waiter<V> {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        Waiter {
            flight: Arc::clone(self),
        }
    }

    /// Waits for the outcome.
    ///
    /// Cancel safe: dropping the future only stops this waiter.
    pub(crate) async fn wait(&self) -> Outcome<V> {
        loop {
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before re-checking, so a completion between the check
            // and the await cannot be missed.
            notified.as_mut().enable();
            if let Some(outcome) = self.outcome.get() {
                return outcome.clone();
            }
            notified.await;
        }
    }
}

/// One caller's claim on a [`Flight`]. While no waiter is left, a flight that
/// has not been dispatched yet is dropped from its batch.
#[derive(Debug)]
pub(crate) struct Waiter<V> {
    flight: Arc<Flight<V>>,
}

impl<V: Clone> Waiter<V> {
    pub(crate) async fn wait(&self) -> Outcome<V> {
        self.flight.wait().await
    }
}

impl<V> Drop for Waiter<V> {
    fn drop(&mut self) {
        self.flight.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Completes every flight it holds with [`Error::Closed`] when dropped, unless
/// they were completed already: no waiter is ever left hanging by a task that
/// was torn down or panicked.
#[derive(Debug)]
pub(crate) struct FailUnfinished<V: Clone>(pub(crate) Vec<Arc<Flight<V>>>);

impl<V: Clone> Drop for FailUnfinished<V> {
    fn drop(&mut self) {
        for flight in &self.0 {
            flight.complete(Err(Error::Closed));
        }
    }
}

/// How a key's load was claimed in the in-flight table.
pub(crate) enum Claim<V> {
    /// Nobody was loading it: the caller leads and must settle it.
    Lead,
    /// Someone is loading it: await this flight instead.
    Join(Arc<Flight<V>>),
}

/// The table of keys being loaded right now by one cache.
#[derive(Debug)]
pub(crate) struct InFlight<K: Eq + Hash, V> {
    map: DashMap<K, Arc<Flight<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> InFlight<K, V> {
    pub(crate) fn new() -> Self {
        InFlight {
            map: DashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Claims `key` for `flight`, or returns the flight already loading it.
    pub(crate) fn claim(&self, key: &K, flight: &Arc<Flight<V>>) -> Claim<V> {
        match self.map.entry(key.clone()) {
            Entry::Occupied(entry) => Claim::Join(Arc::clone(entry.get())),
            Entry::Vacant(entry) => {
                entry.insert(Arc::clone(flight));
                Claim::Lead
            }
        }
    }

    /// Starts a lease over keys this caller leads.
    pub(crate) fn lease(&self) -> Lease<'_, K, V> {
        Lease {
            table: self,
            keys: Vec::new(),
            flights: Vec::new(),
        }
    }

    fn release(&self, key: &K, flight: &Arc<Flight<V>>) {
        self.map
            .remove_if(key, |_, current| Arc::ptr_eq(current, flight));
    }
}

/// The keys one leader holds in the in-flight table. Dropping it removes them
/// from the table (the drop guard of a cancelled or panicked leader);
/// [`Lease::settle`] removes them and then completes their flights.
#[derive(Debug)]
pub(crate) struct Lease<'a, K: Eq + Hash + Clone, V: Clone> {
    table: &'a InFlight<K, V>,
    keys: Vec<K>,
    flights: Vec<Arc<Flight<V>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Lease<'_, K, V> {
    pub(crate) fn push(&mut self, key: K, flight: Arc<Flight<V>>) {
        self.keys.push(key);
        self.flights.push(flight);
    }

    pub(crate) fn flight(&self, index: usize) -> Option<&Arc<Flight<V>>> {
        self.flights.get(index)
    }

    pub(crate) fn keys(&self) -> &[K] {
        &self.keys
    }

    /// Leaves the table, then hands each flight its outcome: outcomes
    /// aligned with [`keys`](Lease::keys), or one error for all.
    ///
    /// Leaving first means a newcomer never joins a flight that is about to
    /// fail; it goes to the store, which already holds what succeeded.
    pub(crate) fn settle(mut self, outcome: Result<Vec<Outcome<V>>, Error>) {
        self.leave_all();
        let flights = std::mem::take(&mut self.flights);
        match outcome {
            Ok(outcomes) => {
                debug_assert_eq!(outcomes.len(), flights.len());
                for (flight, outcome) in flights.iter().zip(outcomes) {
                    flight.complete(outcome);
                }
            }
            Err(err) => {
                for flight in &flights {
                    flight.complete(Err(err.clone()));
                }
            }
        }
    }

    /// Leaves the table for the keys at `indices` (into
    /// [`keys`](Lease::keys)): from now on, loads of them no longer join this
    /// lease's flights. Idempotent.
    pub(crate) fn leave(&self, indices: &[usize]) {
        for &i in indices {
            if let (Some(key), Some(flight)) = (self.keys.get(i), self.flights.get(i)) {
                self.table.release(key, flight);
            }
        }
    }

    fn leave_all(&mut self) {
        for (key, flight) in self.keys.iter().zip(&self.flights) {
            self.table.release(key, flight);
        }
        self.keys.clear();
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Lease<'_, K, V> {
    fn drop(&mut self) {
        self.leave_all();
    }
}
