//! The simulated provider's latency, kept to tens of microseconds.
//!
//! tokio's timer works in whole milliseconds: a sleep ends at a tick after
//! its deadline, so a `sleep(20 ms)` lasts from 20 to 21 ms or more,
//! depending on where in the millisecond it began and on when the runtime
//! next looks at its timers. A provider's answers are not quantized that
//! way, and the rounding is not neutral between strategies: in the open
//! scenario on one instance it added about 1 ms to cache-aside's median
//! request and 0.2 ms to loadlock's. [`sleep`] is ended by a thread of its
//! own, which wakes the sleeping task within tens of microseconds of its
//! deadline, whatever the phase (a provider call of 20 ms measured
//! 20.1–20.2 ms at the median from the caller's side).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// A sleeper waiting for its deadline; ordered by deadline, then arrival.
struct Sleeper {
    at: Instant,
    seq: u64,
    wake: oneshot::Sender<()>,
}

impl PartialEq for Sleeper {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for Sleeper {}

impl PartialOrd for Sleeper {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Sleeper {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Sleepers {
    /// Earliest deadline first, and the number of the next sleeper.
    queue: Mutex<(BinaryHeap<Reverse<Sleeper>>, u64)>,
    /// Signalled when a sleeper with an earlier deadline than all the
    /// others arrives.
    earlier: Condvar,
}

fn sleepers() -> &'static Sleepers {
    static SLEEPERS: OnceLock<&'static Sleepers> = OnceLock::new();
    SLEEPERS.get_or_init(|| {
        let sleepers: &'static Sleepers = Box::leak(Box::default());
        std::thread::Builder::new()
            .name("provider-latency".into())
            .spawn(move || wake_on_time(sleepers))
            .expect("a thread for the provider's latency");
        sleepers
    })
}

/// Wakes each sleeper at its deadline, for as long as the process runs.
fn wake_on_time(sleepers: &Sleepers) {
    let mut queue = sleepers.queue.lock().unwrap();
    loop {
        let now = Instant::now();
        match queue.0.peek() {
            None => queue = sleepers.earlier.wait(queue).unwrap(),
            Some(Reverse(first)) if first.at <= now => {
                if let Some(Reverse(due)) = queue.0.pop() {
                    // A sleeper dropped meanwhile is skipped.
                    let _ = due.wake.send(());
                }
            }
            Some(Reverse(first)) => {
                let left = first.at - now;
                queue = sleepers.earlier.wait_timeout(queue, left).unwrap().0;
            }
        }
    }
}

/// Sleeps for `duration`, ending within tens of microseconds of it.
/// Cancel safe: a dropped sleep is forgotten at its deadline.
pub async fn sleep(duration: Duration) {
    let sleepers = sleepers();
    let (wake, woken) = oneshot::channel();
    let at = Instant::now() + duration;
    {
        let mut queue = sleepers.queue.lock().unwrap();
        let seq = queue.1;
        queue.1 += 1;
        let first = queue.0.peek().is_none_or(|Reverse(first)| at < first.at);
        queue.0.push(Reverse(Sleeper { at, seq, wake }));
        if first {
            sleepers.earlier.notify_one();
        }
    }
    let _ = woken.await;
}
