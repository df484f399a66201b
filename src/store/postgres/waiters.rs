//! Fills waiting for another holder's lease, and the wake-ups the listener
//! hands them: a publish or release of the keys (announced by their holder
//! when the rows say someone waits, or by this process's own fills), an
//! invalidation, or a lost event connection (everyone re-reads).
//!
//! A fill waits for *every* key it found leased to others before it reads
//! them again: a wake-up per key would make it read (and claim what is
//! still missing) once per call its keys wait for, where one read after
//! the last of them answers the same. Wake-ups are counted per key, so a
//! fill that claimed before registering misses none that came meanwhile
//! for its keys, and is not woken by those for other keys.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// How many recent wake-ups, and keys in them, are kept for fills
/// registering after their claim: one that claimed before the oldest of
/// them re-reads at once.
const RECENT: usize = 256;
const RECENT_KEYS: usize = 4096;

/// The wake-ups of the fills waiting, per namespace, per key.
type Slots = HashMap<String, HashMap<String, Vec<Arc<Waiting>>>>;

/// The registry of waiting fills.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    state: Mutex<State>,
    /// Whether the listener is listening: every publish and release is
    /// then heard, and a wait needs no poll before its lease ends.
    listening: AtomicBool,
}

#[derive(Debug, Default)]
struct State {
    slots: Slots,
    /// Counts wake-ups of any kind: a fill that reads it before claiming
    /// and registers after is told of those that came in between.
    epoch: u64,
    /// The latest wake-ups, the newest last, with the epoch each ended.
    recent: VecDeque<(u64, Woke)>,
    /// How many keys `recent` names.
    recent_keys: usize,
}

/// What one wake-up was about.
#[derive(Debug)]
enum Woke {
    Keys(String, Vec<String>),
    /// Every key of a namespace (of every namespace for `None`).
    All(Option<String>),
}

impl Woke {
    fn keys(&self) -> usize {
        match self {
            Woke::Keys(_, keys) => keys.len(),
            Woke::All(_) => 0,
        }
    }

    fn covers(&self, namespace: &str, key: &str) -> bool {
        match self {
            Woke::Keys(ns, keys) => ns == namespace && keys.iter().any(|k| k == key),
            Woke::All(ns) => ns.as_deref().is_none_or(|ns| ns == namespace),
        }
    }
}

/// One fill's wait: the keys not woken yet, and its wake-up.
#[derive(Debug)]
struct Waiting {
    left: Mutex<HashSet<String>>,
    notify: Notify,
}

impl Waiting {
    /// Marks `key` woken; wakes the fill when it was the last.
    fn woke(&self, key: &str) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        if left.remove(key) && left.is_empty() {
            self.notify.notify_one();
        }
    }

    fn woke_all(&self) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        if !left.is_empty() {
            left.clear();
            self.notify.notify_one();
        }
    }
}

impl Waiters {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the listener hears every publish now (from its `LISTEN`
    /// until its connection is lost).
    pub(crate) fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }

    /// Set by the listener: `true` once it listens, `false` (before it
    /// wakes everyone) when its connection is lost.
    pub(crate) fn set_listening(&self, listening: bool) {
        self.listening.store(listening, Ordering::SeqCst);
    }

    /// How many wake-ups were handed out so far: read before a claim, and
    /// given to [`register`](Self::register) after it.
    pub(crate) fn epoch(&self) -> u64 {
        self.state().epoch
    }

    /// Registers interest in `keys` of `namespace`, as of `since` (an
    /// [`epoch`](Self::epoch) read before the claim that found them
    /// leased); woken once every one of them had an event since then, even
    /// if the last arrives before the wait starts (the wake-up is kept as
    /// a permit). A fill that registers after more than the kept recent
    /// wake-ups is woken at once.
    pub(crate) fn register<'k>(
        self: &Arc<Self>,
        namespace: &str,
        keys: impl IntoIterator<Item = &'k str>,
        since: u64,
    ) -> Registration {
        let keys: Vec<String> = keys.into_iter().map(str::to_owned).collect();
        let mut state = self.state();
        let mut left: HashSet<String> = keys.iter().cloned().collect();
        let kept_since = state
            .recent
            .front()
            .map_or(state.epoch, |(epoch, _)| epoch - 1);
        if since < kept_since {
            left.clear();
        } else {
            for (_, woke) in state.recent.iter().filter(|(epoch, _)| *epoch > since) {
                left.retain(|key| !woke.covers(namespace, key));
            }
        }
        let waiting = Arc::new(Waiting {
            notify: Notify::new(),
            left: Mutex::new(HashSet::new()),
        });
        if left.is_empty() {
            waiting.notify.notify_one();
        } else {
            let slots = state.slots.entry(namespace.to_owned()).or_default();
            for key in &left {
                slots
                    .entry(key.clone())
                    .or_default()
                    .push(Arc::clone(&waiting));
            }
            *waiting.left.lock().unwrap_or_else(|e| e.into_inner()) = left;
        }
        Registration {
            waiters: Arc::clone(self),
            namespace: namespace.to_owned(),
            keys,
            waiting,
        }
    }

    /// Counts a wake-up and keeps it for fills registering late.
    fn remember(state: &mut State, woke: Woke) {
        state.epoch += 1;
        state.recent_keys += woke.keys();
        let epoch = state.epoch;
        state.recent.push_back((epoch, woke));
        while state.recent.len() > RECENT || state.recent_keys > RECENT_KEYS {
            let Some((_, old)) = state.recent.pop_front() else {
                break;
            };
            state.recent_keys -= old.keys();
        }
    }

    /// Tells the fills waiting for any of `keys` that these came.
    pub(crate) fn wake_keys<'k>(&self, namespace: &str, keys: impl IntoIterator<Item = &'k str>) {
        let keys: Vec<String> = keys.into_iter().map(str::to_owned).collect();
        let mut state = self.state();
        if let Some(slots) = state.slots.get(namespace) {
            for key in &keys {
                for waiting in slots.get(key).into_iter().flatten() {
                    waiting.woke(key);
                }
            }
        }
        Self::remember(&mut state, Woke::Keys(namespace.to_owned(), keys));
    }

    /// Wakes the fills waiting in `namespace` (every namespace for `None`).
    pub(crate) fn wake_all(&self, namespace: Option<&str>) {
        let mut state = self.state();
        for (ns, slots) in &state.slots {
            if namespace.is_none_or(|wanted| wanted == ns) {
                slots.values().flatten().for_each(|w| w.woke_all());
            }
        }
        Self::remember(&mut state, Woke::All(namespace.map(str::to_owned)));
    }
}

/// One fill's interest in some keys; withdrawn on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    waiters: Arc<Waiters>,
    namespace: String,
    keys: Vec<String>,
    waiting: Arc<Waiting>,
}

impl Registration {
    /// Resolves once every key registered had a wake-up (at once if they
    /// all had one before).
    pub(crate) async fn woken(&self) {
        self.waiting.notify.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.waiters.state();
        let Some(slots) = state.slots.get_mut(&self.namespace) else {
            return;
        };
        for key in &self.keys {
            if let Some(waiting) = slots.get_mut(key) {
                waiting.retain(|w| !Arc::ptr_eq(w, &self.waiting));
                if waiting.is_empty() {
                    slots.remove(key);
                }
            }
        }
        if slots.is_empty() {
            state.slots.remove(&self.namespace);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn woken_soon(registration: &Registration) -> bool {
        tokio::time::timeout(Duration::from_millis(50), registration.woken())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_wait_ends_when_every_key_came() {
        let waiters = Arc::new(Waiters::default());
        let since = waiters.epoch();
        let registration = waiters.register("ns", ["a", "b"], since);
        waiters.wake_keys("ns", ["a"]);
        waiters.wake_keys("other", ["b"]);
        assert!(!woken_soon(&registration).await, "b has not come");
        waiters.wake_keys("ns", ["b", "c"]);
        assert!(woken_soon(&registration).await);
    }

    #[tokio::test]
    async fn wake_ups_between_claim_and_registration_count_per_key() {
        let waiters = Arc::new(Waiters::default());
        let since = waiters.epoch();
        waiters.wake_keys("ns", ["x"]);
        waiters.wake_keys("ns", ["a"]);
        let registration = waiters.register("ns", ["a", "b"], since);
        assert!(!woken_soon(&registration).await, "only a came before");
        waiters.wake_keys("ns", ["b"]);
        assert!(woken_soon(&registration).await);

        let since = waiters.epoch();
        waiters.wake_all(Some("ns"));
        let registration = waiters.register("ns", ["a"], since);
        assert!(woken_soon(&registration).await, "the namespace was woken");
    }

    #[tokio::test]
    async fn a_registration_older_than_the_kept_wake_ups_is_woken_at_once() {
        let waiters = Arc::new(Waiters::default());
        let since = waiters.epoch();
        for _ in 0..=RECENT {
            waiters.wake_keys("ns", ["x"]);
        }
        let registration = waiters.register("ns", ["a"], since);
        assert!(woken_soon(&registration).await);
        let registration = waiters.register("ns", ["a"], waiters.epoch());
        assert!(!woken_soon(&registration).await);
        waiters.wake_all(None);
        assert!(woken_soon(&registration).await);

        // So is one older than kept keys: a wake-up names at most so many.
        let since = waiters.epoch();
        let many: Vec<String> = (0..=RECENT_KEYS).map(|i| format!("k{i}")).collect();
        waiters.wake_keys("ns", many.iter().map(String::as_str));
        let registration = waiters.register("ns", ["a"], since);
        assert!(woken_soon(&registration).await);
    }
}
