//! Fills waiting for another holder's lease, and the wake-ups the listener
//! hands them: a publish or release of the keys (announced by their holder
//! when the rows say someone waits, or by this process's own fills), an
//! invalidation, or a lost event connection (everyone re-reads).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The wake-ups of the fills waiting, per namespace, per key.
type Slots = HashMap<String, HashMap<String, Vec<Arc<Notify>>>>;

/// The registry of waiting fills.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<Slots>,
    /// Counts wake-ups of any kind: a fill that reads it before claiming
    /// and registers after can tell whether it may have missed one.
    epoch: AtomicU64,
}

impl Waiters {
    /// How many wake-ups were handed out so far.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Registers interest in `keys` of `namespace`; woken once by the first
    /// event about any of them, even one that arrives before the wait
    /// starts (the wake-up is kept as a permit). Events that came before
    /// registering are seen through [`epoch`](Self::epoch).
    pub(crate) fn register<'k>(
        self: &Arc<Self>,
        namespace: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> Registration {
        let notify = Arc::new(Notify::new());
        let keys: Vec<String> = keys.into_iter().map(str::to_owned).collect();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let slots = map.entry(namespace.to_owned()).or_default();
        for key in &keys {
            slots
                .entry(key.clone())
                .or_default()
                .push(Arc::clone(&notify));
        }
        Registration {
            waiters: Arc::clone(self),
            namespace: namespace.to_owned(),
            keys,
            notify,
        }
    }

    /// Wakes the fills waiting for any of `keys`.
    pub(crate) fn wake_keys<'k>(&self, namespace: &str, keys: impl IntoIterator<Item = &'k str>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slots) = map.get(namespace) else {
            return;
        };
        for key in keys {
            if let Some(waiting) = slots.get(key) {
                waiting.iter().for_each(|n| n.notify_one());
            }
        }
    }

    /// Wakes the fills waiting in `namespace` (every namespace for `None`).
    pub(crate) fn wake_all(&self, namespace: Option<&str>) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for (ns, slots) in map.iter() {
            if namespace.is_none_or(|wanted| wanted == ns) {
                slots.values().flatten().for_each(|n| n.notify_one());
            }
        }
    }
}

/// One fill's interest in some keys; withdrawn on drop.
#[derive(Debug)]
pub(crate) struct Registration {
    waiters: Arc<Waiters>,
    namespace: String,
    keys: Vec<String>,
    notify: Arc<Notify>,
}

impl Registration {
    /// Resolves at the first wake-up since registering (or since the last
    /// wake-up this returned for).
    pub(crate) async fn woken(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.waiters.map.lock().unwrap_or_else(|e| e.into_inner());
        let Some(slots) = map.get_mut(&self.namespace) else {
            return;
        };
        for key in &self.keys {
            if let Some(waiting) = slots.get_mut(key) {
                waiting.retain(|n| !Arc::ptr_eq(n, &self.notify));
                if waiting.is_empty() {
                    slots.remove(key);
                }
            }
        }
        if slots.is_empty() {
            map.remove(&self.namespace);
        }
    }
}
