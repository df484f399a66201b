//! Per-key exclusive locks of a [`MemoryStore`](super::MemoryStore), taken
//! in ascending id order; a release wakes only the waiters of its own keys.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// The lock ids held, each with the notification of its waiters (made by
/// the first waiter: an uncontended lock costs no allocation). Taking a
/// batch's locks costs one mutex acquisition when they are free.
#[derive(Default)]
pub(super) struct KeyLocks {
    held: Mutex<HashMap<i64, Option<Arc<Notify>>>>,
}

impl KeyLocks {
    fn held(&self) -> MutexGuard<'_, HashMap<i64, Option<Arc<Notify>>>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the locks of `ids` in ascending order (so two callers never
    /// deadlock: whoever waits holds only lower ids than the one it waits
    /// for). Cancel safe: whatever was taken is released on drop.
    pub(super) async fn lock_all(&self, mut ids: Vec<i64>) -> HeldLocks<'_> {
        ids.sort_unstable();
        ids.dedup();
        let mut held = HeldLocks {
            owner: self,
            ids: Vec::with_capacity(ids.len()),
        };
        let mut next = 0;
        loop {
            let (id, released) = {
                let mut set = self.held();
                loop {
                    let Some(&id) = ids.get(next) else {
                        return held;
                    };
                    match set.get_mut(&id) {
                        Some(waiters) => {
                            break (id, Arc::clone(waiters.get_or_insert_with(Default::default)))
                        }
                        None => {
                            set.insert(id, None);
                            held.ids.push(id);
                            next += 1;
                        }
                    }
                }
            };
            let notified = released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Still held by the holder whose release notifies `released`
            // (registered now, so that release cannot be missed)? Otherwise
            // it was released meanwhile: look again.
            let same_holder = matches!(
                self.held().get(&id),
                Some(Some(waiters)) if Arc::ptr_eq(waiters, &released)
            );
            if same_holder {
                notified.await;
            }
        }
    }

    /// Takes the locks of `ids` if every one is free, at once; `None`
    /// (holding nothing) otherwise.
    pub(super) fn try_lock_all(&self, mut ids: Vec<i64>) -> Option<HeldLocks<'_>> {
        ids.sort_unstable();
        ids.dedup();
        let mut set = self.held();
        if ids.iter().any(|id| set.contains_key(id)) {
            return None;
        }
        set.extend(ids.iter().map(|&id| (id, None)));
        drop(set);
        Some(HeldLocks { owner: self, ids })
    }
}

/// The locks one caller holds; released on drop, waking their waiters.
pub(super) struct HeldLocks<'a> {
    owner: &'a KeyLocks,
    ids: Vec<i64>,
}

impl Drop for HeldLocks<'_> {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let mut woken = Vec::new();
        {
            let mut set = self.owner.held();
            for id in &self.ids {
                if let Some(Some(waiters)) = set.remove(id) {
                    woken.push(waiters);
                }
            }
        }
        for waiters in woken {
            waiters.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_release_wakes_the_waiter_of_its_key() {
        let locks = Arc::new(KeyLocks::default());
        let first = locks.try_lock_all(vec![1, 2]).expect("free");
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _held = locks.lock_all(vec![2, 3]).await;
            })
        };
        tokio::task::yield_now().await;
        // Waiting for 2, it holds nothing above it.
        drop(locks.try_lock_all(vec![3]).expect("3 is free"));
        drop(first);
        waiter.await.unwrap();
        assert!(locks.try_lock_all(vec![1, 2, 3]).is_some());
    }
}
