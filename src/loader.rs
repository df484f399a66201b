//! [`Loader`]: the per-request handle, its memo (tier 0), and its batch
//! window: the first key a loader is asked for (while its window is empty)
//! spawns a task that sleeps for the window, takes every key collected
//! meanwhile and runs them as one batch (`batch`).

use std::collections::HashMap;
use std::fmt;
use std::mem;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::join_all;
use tracing::field::Empty;
use tracing::Instrument;

use crate::batch::{self, Batch};
use crate::cache::CacheInner;
use crate::inflight::{FailUnfinished, Flight, Waiter};
use crate::stats::Counters;
use crate::{BatchFetch, Entry, Error};

/// A per-request loader: collects the keys a request asks for during one
/// batch window, deduplicates them, and loads them as one batch through its
/// [`Cache`](crate::Cache).
///
/// Create one per request with [`Cache::loader`](crate::Cache::loader). Its
/// memo keeps each key's answer for the loader's whole life, so one request
/// sees one consistent value per key however often it asks; a failed load is
/// not remembered, and the next load of that key tries again. Clones share
/// the memo (hand a clone to each resolver or task of the request).
///
/// Loads need a tokio runtime: each batch runs on a task of its own, so a
/// caller that stops waiting never cancels or stalls the other loads of its
/// batch.
pub struct Loader<F: BatchFetch> {
    shared: Arc<LoaderShared<F>>,
}

pub(crate) struct LoaderShared<F: BatchFetch> {
    pub(crate) cache: Arc<CacheInner<F>>,
    state: Mutex<LoaderState<F::Key, Entry<F::Value>>>,
}

struct LoaderState<K, V> {
    /// Every key this loader has answered or is answering. A failed flight
    /// here is stale: the key is loaded afresh.
    memo: HashMap<K, Arc<Flight<V>>>,
    /// Keys waiting for the current batch window, in first-asked order.
    pending: Vec<(K, Arc<Flight<V>>)>,
    /// Whether `clear` or `clear_all` ran while keys were pending: a key
    /// cleared and loaded again is pending twice, on two flights.
    cleared: bool,
}

/// A caller's claim on one key's answer.
type EntryWaiter<F> = Waiter<Entry<<F as BatchFetch>::Value>>;

/// The flights of keys a window held twice (cleared and loaded again while
/// pending), each with the flight of the same key the batch loads.
pub(crate) type Followers<V> = Vec<(Arc<Flight<V>>, Arc<Flight<V>>)>;

/// What [`LoaderShared::take_batch`] takes from a window.
pub(crate) type Taken<K, V> = (Batch<K, V>, Followers<V>);

impl<F: BatchFetch> Clone for Loader<F> {
    fn clone(&self) -> Self {
        Loader {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<F: BatchFetch> fmt::Debug for Loader<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.state();
        f.debug_struct("Loader")
            .field("namespace", self.shared.cache.provider.namespace())
            .field("memo", &state.memo.len())
            .field("pending", &state.pending.len())
            .finish()
    }
}

impl<F: BatchFetch> Loader<F> {
    pub(crate) fn new(cache: Arc<CacheInner<F>>) -> Self {
        Loader {
            shared: Arc::new(LoaderShared {
                cache,
                state: Mutex::new(LoaderState {
                    memo: HashMap::new(),
                    pending: Vec::new(),
                    cleared: false,
                }),
            }),
        }
    }

    /// Loads one key: `Ok(Some(value))`, or `Ok(None)` when the provider has
    /// no such resource (a negative entry, cached for the negative TTL).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe. Dropping the future stops only this caller: the batch
    /// goes on for the other callers, and a key nobody waits for any more is
    /// dropped from its batch before dispatch.
    ///
    /// # Concurrent calls on the same key
    ///
    /// Loads of one key in this loader share one answer; loads of a key that
    /// another loader of the cache is loading join that load.
    ///
    /// # Errors
    ///
    /// [`Error::Provider`] / [`Error::ProviderPanicked`] when the provider
    /// call for the key's batch failed; [`Error::Store`] when the store did;
    /// [`Error::Closed`] when the runtime shut down under the batch.
    pub async fn load(&self, key: F::Key) -> Result<Option<F::Value>, Error> {
        Ok(self.load_entry(key).await?.map(|entry| entry.value))
    }

    /// Loads one key with its version and times ([`Entry`]); `Ok(None)` when
    /// the provider has no such resource. Loads, guarantees and errors as
    /// [`load`](Loader::load), with which it shares the memo.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`load`](Loader::load).
    ///
    /// # Errors
    ///
    /// As [`load`](Loader::load).
    pub async fn load_entry(&self, key: F::Key) -> Result<Option<Entry<F::Value>>, Error> {
        let waiter = self.shared.register(std::iter::once(key));
        let outcome = match waiter.first() {
            Some((_, waiter)) => waiter.wait().await,
            None => Ok(None),
        };
        if outcome.is_err() {
            Counters::add(&self.shared.cache.counters.errors, 1);
        }
        outcome
    }

    /// Loads many keys at once; the map holds the keys that were found (keys
    /// the provider does not have are absent). Duplicates are loaded once.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe, as [`load`](Loader::load).
    ///
    /// # Errors
    ///
    /// As [`load`](Loader::load): the first error among the keys.
    pub async fn load_many(
        &self,
        keys: impl IntoIterator<Item = F::Key>,
    ) -> Result<HashMap<F::Key, F::Value>, Error> {
        let waiters = self.shared.register(keys);
        let mut found = HashMap::with_capacity(waiters.len());
        for (key, waiter) in waiters {
            match waiter.wait().await {
                Ok(Some(entry)) => {
                    found.insert(key, entry.value);
                }
                Ok(None) => {}
                Err(err) => {
                    Counters::add(&self.shared.cache.counters.errors, 1);
                    return Err(err);
                }
            }
        }
        Ok(found)
    }

    /// Puts `value` in this loader's memo for `key`, unless the memo already
    /// has an answer (or a load under way) for it: prime never overwrites.
    /// To replace, [`clear`](Loader::clear) first. Priming touches neither
    /// the store nor other loaders.
    pub fn prime(&self, key: F::Key, value: F::Value) {
        let mut state = self.shared.state();
        match state.memo.get(&key) {
            Some(flight) if !flight.has_failed() => {}
            _ => {
                let now = std::time::SystemTime::now();
                let entry = Entry::new(value, 0, now, now);
                state.memo.insert(key, Flight::ready(Some(entry)));
            }
        }
    }

    /// Forgets `key` in this loader's memo: the next load asks the cache
    /// again. A load of it already under way still completes for its callers.
    pub fn clear(&self, key: &F::Key) {
        let mut state = self.shared.state();
        state.cleared |= !state.pending.is_empty();
        state.memo.remove(key);
    }

    /// Forgets every key in this loader's memo.
    pub fn clear_all(&self) {
        let mut state = self.shared.state();
        state.cleared |= !state.pending.is_empty();
        state.memo.clear();
    }
}

impl<F: BatchFetch> LoaderShared<F> {
    fn state(&self) -> MutexGuard<'_, LoaderState<F::Key, Entry<F::Value>>> {
        // The state is consistent between statements; a panic elsewhere while
        // it was held does not poison the request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the caller on each key: on its memo entry if the loader has
    /// one, else on a new flight added to the current batch window (starting
    /// the window when it was empty).
    fn register(
        self: &Arc<Self>,
        keys: impl IntoIterator<Item = F::Key>,
    ) -> Vec<(F::Key, EntryWaiter<F>)> {
        let keys = keys.into_iter();
        let mut waiters = Vec::with_capacity(keys.size_hint().0);
        let mut memo_hits = 0;
        let start_window = {
            let mut state = self.state();
            let was_empty = state.pending.is_empty();
            for key in keys {
                let flight = match state.memo.get(&key) {
                    Some(flight) if !flight.has_failed() => {
                        memo_hits += 1;
                        Arc::clone(flight)
                    }
                    _ => {
                        let flight = Flight::pending();
                        state.memo.insert(key.clone(), Arc::clone(&flight));
                        state.pending.push((key.clone(), Arc::clone(&flight)));
                        flight
                    }
                };
                // Under the lock, so a batch dropping callerless keys never
                // races a new caller of the same key.
                waiters.push((key, flight.waiter()));
            }
            was_empty && !state.pending.is_empty()
        };
        let counters = &self.cache.counters;
        Counters::add(&counters.loads, waiters.len());
        Counters::add(&counters.memo_hits, memo_hits);
        if start_window {
            spawn_window(Arc::clone(self));
        }
        waiters
    }

    /// Takes the keys of the current window, each once: a key pending
    /// twice (cleared and loaded again meanwhile) is loaded once, and its
    /// later flight follows the first. Keys whose every caller has gone are
    /// dropped (and forgotten) instead of dispatched.
    pub(crate) fn take_batch(&self) -> Taken<F::Key, Entry<F::Value>> {
        let mut state = self.state();
        let pending = mem::take(&mut state.pending);
        // Only a clear while keys were pending can repeat a key.
        let mut firsts = mem::take(&mut state.cleared).then(HashMap::new);
        let mut followers = Vec::new();
        let mut batch = Vec::with_capacity(pending.len());
        for (key, flight) in pending {
            if flight.waiters() > 0 {
                if let Some(firsts) = &mut firsts {
                    match firsts.entry(key.clone()) {
                        std::collections::hash_map::Entry::Occupied(first) => {
                            followers.push((flight, Arc::clone(first.get())));
                            continue;
                        }
                        std::collections::hash_map::Entry::Vacant(first) => {
                            first.insert(Arc::clone(&flight));
                        }
                    }
                }
                batch.push((key, flight));
                continue;
            }
            if state
                .memo
                .get(&key)
                .is_some_and(|current| Arc::ptr_eq(current, &flight))
            {
                state.memo.remove(&key);
            }
            flight.complete(Err(Error::Closed));
        }
        (batch, followers)
    }
}

/// Starts the batch window of `loader` on a task of its own, in the caller's
/// tracing span.
pub(crate) fn spawn_window<F: BatchFetch>(loader: Arc<LoaderShared<F>>) {
    let window = loader.cache.config.batch_window;
    let parent = tracing::Span::current();
    let mut pending = PendingGuard {
        loader,
        taken: false,
    };
    tokio::spawn(async move {
        if !window.is_zero() {
            tokio::time::sleep(window).await;
        }
        let (batch, followers) = pending.take();
        if batch.is_empty() {
            return;
        }
        let cache = &pending.loader.cache;
        let span = tracing::debug_span!(
            parent: &parent,
            "loadlock.batch",
            namespace = %cache.provider.namespace(),
            keys = batch.len(),
            coalesced = Empty,
            store_hits = Empty,
            negative_hits = Empty,
            fetched = Empty,
            duration_ms = Empty,
        );
        let follow = async {
            let _unfinished =
                FailUnfinished(followers.iter().map(|(mine, _)| Arc::clone(mine)).collect());
            join_all(
                followers
                    .iter()
                    .map(|(mine, first)| async move { mine.complete(first.wait().await) }),
            )
            .await
        };
        futures::join!(
            crate::handoff::scope(batch::run(cache, batch).instrument(span)),
            follow
        );
    });
}

/// Until the window's keys are taken, dropping the window task (a runtime
/// shutting down) fails them instead of leaving their callers waiting.
struct PendingGuard<F: BatchFetch> {
    loader: Arc<LoaderShared<F>>,
    taken: bool,
}

impl<F: BatchFetch> PendingGuard<F> {
    fn take(&mut self) -> Taken<F::Key, Entry<F::Value>> {
        self.taken = true;
        self.loader.take_batch()
    }
}

impl<F: BatchFetch> Drop for PendingGuard<F> {
    fn drop(&mut self) {
        if !self.taken {
            let (batch, followers) = self.loader.take_batch();
            for flight in batch
                .into_iter()
                .map(|(_, f)| f)
                .chain(followers.into_iter().map(|(f, _)| f))
            {
                flight.complete(Err(Error::Closed));
            }
        }
    }
}
