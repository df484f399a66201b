//! A connection handed from a batch's read to the fill that follows it.
//!
//! A batch reads its keys, then (for the keys the read missed) claims them.
//! Between the two, it only sorts the answers and registers its flights:
//! microseconds. Returning the read's connection to the pool and acquiring
//! one again for the claim would put the claim at the back of the pool's
//! queue (and pay the pool's liveness check), which under load costs more
//! than everything else on a miss. So a store may offer the connection here,
//! and the batch's next statement takes it.
//!
//! The slot lives in the batch's task: nothing outside the batch sees it,
//! and it is emptied (the connection returned to its pool) as soon as the
//! batch knows it leads no fill, before anything that may wait: a connection
//! is never held across a provider call, a rate-limit wait or a wait for
//! another fill.

use std::any::Any;
use std::cell::RefCell;
use std::future::Future;

/// What a store offered: its own identity, and the connection.
type Offered = (usize, Box<dyn Any + Send>);

tokio::task_local! {
    static SLOT: RefCell<Option<Offered>>;
}

/// Runs `batch` with an empty slot.
pub(crate) async fn scope<T>(batch: impl Future<Output = T>) -> T {
    SLOT.scope(RefCell::new(None), batch).await
}

/// Offers `value` from the store `owner` to the batch's next statement.
/// Outside a batch (or with the slot taken) it is dropped at once.
pub(crate) fn offer<T: Any + Send>(owner: usize, value: T) {
    let _ = SLOT.try_with(|slot| {
        let mut slot = slot.borrow_mut();
        if slot.is_none() {
            *slot = Some((owner, Box::new(value)));
        }
    });
}

/// Takes what the store `owner` offered, if it is a `T`. What another
/// store offered is dropped: the batch has moved on to another store (a
/// shard), and must not keep the first one's connection (and its lane)
/// while it works elsewhere.
pub(crate) fn take<T: Any + Send>(owner: usize) -> Option<T> {
    let (taken, foreign) = SLOT
        .try_with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.take() {
                Some((offered_by, value)) if offered_by == owner && value.is::<T>() => {
                    (value.downcast::<T>().ok().map(|value| *value), None)
                }
                Some((offered_by, value)) if offered_by != owner => (None, Some(value)),
                other => {
                    *slot = other;
                    (None, None)
                }
            }
        })
        .unwrap_or((None, None));
    // Dropped outside the slot's borrow: a connection goes back to its
    // pool.
    drop(foreign);
    taken
}

/// Drops whatever was offered (a connection goes back to its pool).
pub(crate) fn clear() {
    let dropped = SLOT
        .try_with(|slot| slot.borrow_mut().take())
        .ok()
        .flatten();
    drop(dropped);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_its_owner_takes_an_offer_and_only_within_a_scope() {
        offer(1, 5_u32);
        assert_eq!(take::<u32>(1), None, "nothing is kept outside a batch");
        scope(async {
            offer(1, 5_u32);
            offer(1, 6_u32);
            assert_eq!(take::<u64>(1), None, "another type");
            assert_eq!(take::<u32>(1), Some(5), "the first offer stays");
            assert_eq!(take::<u32>(1), None, "taken once");
            offer(1, 8_u32);
            assert_eq!(take::<u32>(2), None, "another store's offer");
            assert_eq!(take::<u32>(1), None, "dropped when another store takes");
            offer(1, 7_u32);
            clear();
            assert_eq!(take::<u32>(1), None, "cleared");
        })
        .await;
    }
}
