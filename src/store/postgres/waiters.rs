//! Fills waiting for another holder's lease, and the wake-ups the listener
//! hands them: a publish or release of the keys (announced by their holder
//! when the rows say someone waits), an invalidation, or a lost event
//! connection (everyone re-reads).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The wake-ups of the fills waiting for one `(namespace, key)`.
type Slots = HashMap<(String, String), Vec<Arc<Notify>>>;

/// The registry of waiting fills, per `(namespace, key)`.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<Slots>,
}

impl Waiters {
    /// Registers interest in `keys` of `namespace`; woken once by the first
    /// event about any of them, even one that arrives before the wait
    /// starts (the wake-up is kept as a permit).
    pub(crate) fn register(self: &Arc<Self>, namespace: &str, keys: &[String]) -> Registration {
        let notify = Arc::new(Notify::new());
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            map.entry((namespace.to_owned(), key.clone()))
                .or_default()
                .push(Arc::clone(&notify));
        }
        Registration {
            waiters: Arc::clone(self),
            namespace: namespace.to_owned(),
            keys: keys.to_vec(),
            notify,
        }
    }

    /// Wakes the fills waiting for any of `keys`.
    pub(crate) fn wake_keys(&self, namespace: &str, keys: &[String]) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.is_empty() {
            return;
        }
        for key in keys {
            if let Some(waiting) = map.get(&(namespace.to_owned(), key.clone())) {
                waiting.iter().for_each(|n| n.notify_one());
            }
        }
    }

    /// Wakes the fills waiting in `namespace` (every namespace for `None`).
    pub(crate) fn wake_all(&self, namespace: Option<&str>) {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        for ((ns, _), waiting) in map.iter() {
            if namespace.map_or(true, |wanted| wanted == ns) {
                waiting.iter().for_each(|n| n.notify_one());
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
        for key in &self.keys {
            let slot = (self.namespace.clone(), key.clone());
            if let Some(waiting) = map.get_mut(&slot) {
                waiting.retain(|n| !Arc::ptr_eq(n, &self.notify));
                if waiting.is_empty() {
                    map.remove(&slot);
                }
            }
        }
    }
}
