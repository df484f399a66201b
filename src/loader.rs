//! [`Loader`]: the per-request handle, its memo (tier 0), and its batch
//! window: the first key a loader is asked for (while its window is empty)
//! spawns a task that collects keys until no more arrive (or the window
//! ends, or it holds a full provider call), takes them and runs them as one
//! batch (`batch`).

use std::collections::HashMap;
use std::fmt;
use std::mem;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tracing::field::Empty;
use tracing::Instrument;

use crate::batch::{self, Batch};
use crate::entry::Shared;
use crate::inflight::{FailUnfinished, Flight, Outcome, Waiter};
use crate::pipeline::CacheInner;
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
/// batch. Outside a runtime, loads fail with [`Error::NoRuntime`].
pub struct Loader<F: BatchFetch> {
    shared: Arc<LoaderShared<F>>,
}

pub(crate) struct LoaderShared<F: BatchFetch> {
    pub(crate) cache: Arc<CacheInner<F>>,
    state: Mutex<LoaderState<F::Key, Shared<F::Value>>>,
    /// Notified when the window comes to hold a full provider call.
    full: tokio::sync::Notify,
    /// The [`Loader`] handles alive: with more than one, other tasks (given
    /// a clone) may still be about to load.
    handles: AtomicUsize,
}

/// How long a window of one task's keys waits for more once a pass of the
/// scheduler brought none (for resolvers of that task woken a little
/// later), short next to a timer tick (1 ms).
const QUIET: Duration = Duration::from_micros(200);

struct LoaderState<K, V> {
    /// Every key this loader has answered or is answering. A failed flight
    /// here is stale: the key is loaded afresh.
    memo: HashMap<K, Arc<Flight<V>>>,
    /// Keys waiting for the current batch window, in first-asked order.
    pending: Vec<(K, Arc<Flight<V>>)>,
    /// Whether `clear` or `clear_all` ran while keys were pending: a key
    /// cleared and loaded again is pending twice, on two flights.
    cleared: bool,
    /// Whether the current window's keys all came from the task that
    /// started it (see [`LoaderShared::collect`]).
    one_task: bool,
    /// The task that started the current window, if it was a task.
    window_task: Option<tokio::task::Id>,
}

/// What registering a caller on one key gives: the memo's answer when it
/// has one already (no waiter needed), or a claim on the key's flight.
enum Registered<V> {
    Answered(Option<V>),
    Waiting(Waiter<V>),
}

impl<V: Clone> Registered<V> {
    async fn outcome(self) -> Outcome<V> {
        match self {
            Registered::Answered(answer) => Ok(answer),
            Registered::Waiting(waiter) => waiter.wait().await,
        }
    }
}

/// A caller's registration on one key of this loader's cache.
type EntryRegistered<F> = Registered<Shared<<F as BatchFetch>::Value>>;

/// The flights of keys a window held twice (cleared and loaded again while
/// pending), each with the flight of the same key the batch loads.
pub(crate) type Followers<V> = Vec<(Arc<Flight<V>>, Arc<Flight<V>>)>;

/// What [`LoaderShared::take_batch`] takes from a window.
pub(crate) type Taken<K, V> = (Batch<K, V>, Followers<V>);

impl<F: BatchFetch> Clone for Loader<F> {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::AcqRel);
        Loader {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<F: BatchFetch> Drop for Loader<F> {
    fn drop(&mut self) {
        self.shared.handles.fetch_sub(1, Ordering::AcqRel);
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
                    one_task: false,
                    window_task: None,
                }),
                full: tokio::sync::Notify::new(),
                handles: AtomicUsize::new(1),
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
    /// call for the key's batch failed, or failed this key alone (see
    /// [`BatchFetch::fetch_each`]); [`Error::Store`] when the store did;
    /// [`Error::Closed`] when the runtime shut down under the batch;
    /// [`Error::NoRuntime`] when called outside a tokio runtime.
    pub async fn load(&self, key: F::Key) -> Result<Option<F::Value>, Error> {
        Ok(self
            .load_shared(key)
            .await?
            .map(|entry| Shared::unwrap_or_clone(entry).value))
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
        Ok(self.load_shared(key).await?.map(Shared::unwrap_or_clone))
    }

    /// One key's shared entry, for [`load`](Loader::load) and
    /// [`load_entry`](Loader::load_entry) to clone out what they hand over.
    async fn load_shared(&self, key: F::Key) -> Result<Option<Shared<F::Value>>, Error> {
        let mut registered = None;
        self.shared
            .register(std::iter::once(key), |_, r| registered = Some(r));
        let outcome = match registered {
            Some(registered) => registered.outcome().await,
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
        let keys = keys.into_iter();
        let mut registered = Vec::with_capacity(keys.size_hint().0);
        self.shared
            .register(keys, |key, r| registered.push((key, r)));
        let mut found = HashMap::with_capacity(registered.len());
        for (key, registered) in registered {
            match registered.outcome().await {
                Ok(Some(entry)) => {
                    found.insert(key, Shared::unwrap_or_clone(entry).value);
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
                state
                    .memo
                    .insert(key, Flight::ready(Some(Shared::new(entry))));
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
    fn state(&self) -> MutexGuard<'_, LoaderState<F::Key, Shared<F::Value>>> {
        // The state is consistent between statements; a panic elsewhere while
        // it was held does not poison the request.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the caller on each key: answered by its memo entry if that
    /// has an answer, waiting on it if it is loading, else on a new flight
    /// added to the current batch window (starting the window when it was
    /// empty). Hands each key's registration to `each` (under the loader's
    /// lock: it only stores it).
    fn register(
        self: &Arc<Self>,
        keys: impl IntoIterator<Item = F::Key>,
        mut each: impl FnMut(F::Key, EntryRegistered<F>),
    ) {
        let mut loads = 0;
        let mut memo_hits = 0;
        let full = self.cache.config.max_batch_size;
        let (start_window, filled) = {
            let mut state = self.state();
            let was_empty = state.pending.is_empty();
            let before = state.pending.len();
            let was_full = before >= full;
            for key in keys {
                // A waiter is taken under the lock, so a batch dropping
                // callerless keys never races a new caller of the same key.
                let registered = match state.memo.get(&key) {
                    Some(flight) if !flight.has_failed() => {
                        memo_hits += 1;
                        match flight.outcome() {
                            Some(Ok(answer)) => Registered::Answered(answer.clone()),
                            _ => Registered::Waiting(flight.waiter()),
                        }
                    }
                    _ => {
                        let flight = Flight::pending();
                        state.memo.insert(key.clone(), Arc::clone(&flight));
                        state.pending.push((key.clone(), Arc::clone(&flight)));
                        Registered::Waiting(flight.waiter())
                    }
                };
                loads += 1;
                each(key, registered);
            }
            // Which task issued the window's keys (see `collect`); a call
            // that only met the memo adds none.
            if state.pending.len() > before {
                let task = tokio::task::try_id();
                if was_empty {
                    state.window_task = task;
                    // On a current-thread runtime nothing runs while a
                    // caller issues loads: every caller counts as one.
                    state.one_task = task.is_some()
                        || tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
                            runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread
                        });
                } else if task != state.window_task {
                    state.one_task = false;
                }
            }
            (
                was_empty && !state.pending.is_empty(),
                !was_full && state.pending.len() >= full,
            )
        };
        let counters = &self.cache.counters;
        Counters::add(&counters.loads, loads);
        Counters::add(&counters.memo_hits, memo_hits);
        if start_window {
            spawn_window(Arc::clone(self));
        } else if filled {
            self.full.notify_waiters();
        }
    }

    /// How many keys the current window holds, and whether it may end
    /// early: its keys all came from the task that started it, and no
    /// other handle of this loader exists (one handed to a spawned task
    /// may be about to load).
    fn pending_len(&self) -> (usize, bool) {
        let state = self.state();
        let alone = self.handles.load(Ordering::Acquire) <= 1;
        (state.pending.len(), state.one_task && alone)
    }

    /// Collects the current window's keys: returns once it holds a full
    /// provider call (`max_batch_size` keys), once `window` has passed
    /// since its first key, and, when every key so far came from the task
    /// that started the window (a `join_all`, a `load_many`, resolvers of
    /// one task) and the loader has no other handle (no clone given to
    /// another task), as soon as that task stopped issuing loads: the window
    /// task is spawned from it and so first runs when it yields; it then
    /// yields to the scheduler in turn, so that whatever that task's
    /// wake-ups issue comes first, and dispatches when no key arrived for
    /// [`QUIET`]. Keys from several tasks, or of a loader cloned for
    /// other tasks (tasks a request spawned at the same moment, which other
    /// worker threads may still be running), or from outside any task on a
    /// multi-thread runtime (`block_on`) wait out the window, as do all
    /// keys with
    /// [`wait_full_window`](crate::CacheBuilder::wait_full_window).
    async fn collect(&self, window: Duration) {
        let config = &self.cache.config;
        let full = config.max_batch_size;
        if window.is_zero() {
            return;
        }
        let deadline = tokio::time::Instant::now() + window;
        // Real time as well as tokio's: with paused time (tests), tokio's
        // clock stands still while this task yields.
        let started = Instant::now();
        let (mut seen, mut one_task) = self.pending_len();
        let mut quiet_since = started;
        while one_task && !config.wait_full_window {
            if seen >= full {
                return;
            }
            tokio::task::yield_now().await;
            let (now, still_one) = self.pending_len();
            one_task = still_one;
            if now != seen {
                seen = now;
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() >= QUIET {
                return;
            }
            if started.elapsed() >= window || tokio::time::Instant::now() >= deadline {
                return;
            }
        }
        loop {
            let filled = self.full.notified();
            tokio::pin!(filled);
            filled.as_mut().enable();
            if self.pending_len().0 >= full {
                return;
            }
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return,
                () = filled => {}
            }
        }
    }

    /// Takes the keys of the current window, each once: a key pending
    /// twice (cleared and loaded again meanwhile) is loaded once, and its
    /// later flight follows the first. Keys whose every caller has gone are
    /// dropped (and forgotten) instead of dispatched.
    pub(crate) fn take_batch(&self) -> Taken<F::Key, Shared<F::Value>> {
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
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        // No runtime to run the batch on: its callers fail, none panics.
        let (batch, followers) = pending.take();
        for flight in batch
            .into_iter()
            .map(|(_, f)| f)
            .chain(followers.into_iter().map(|(f, _)| f))
        {
            flight.complete(Err(Error::NoRuntime));
        }
        return;
    };
    runtime.spawn(async move {
        pending.loader.collect(window).await;
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
    fn take(&mut self) -> Taken<F::Key, Shared<F::Value>> {
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
