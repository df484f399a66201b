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

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, Once};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// The sleepers' wake-ups by deadline, earliest first (a number breaks
/// ties).
type Sleepers = BTreeMap<(Instant, u64), oneshot::Sender<()>>;

/// The sleepers, and the number of the next one.
static SLEEPERS: Mutex<(Sleepers, u64)> = Mutex::new((BTreeMap::new(), 0));

/// Signalled when a sleeper with an earlier deadline than all the others
/// arrives.
static EARLIER: Condvar = Condvar::new();

/// Wakes each sleeper at its deadline, for as long as the process runs.
fn wake_on_time() {
    let mut sleepers = SLEEPERS.lock().unwrap();
    loop {
        let now = Instant::now();
        match sleepers.0.first_key_value().map(|(&(at, _), _)| at) {
            None => sleepers = EARLIER.wait(sleepers).unwrap(),
            Some(at) if at <= now => {
                if let Some((_, wake)) = sleepers.0.pop_first() {
                    // A sleeper dropped meanwhile is skipped.
                    let _ = wake.send(());
                }
            }
            Some(at) => sleepers = EARLIER.wait_timeout(sleepers, at - now).unwrap().0,
        }
    }
}

/// Sleeps for `duration`, ending within tens of microseconds of it.
/// Cancel safe: a dropped sleep is forgotten at its deadline.
pub async fn sleep(duration: Duration) {
    static WAKER: Once = Once::new();
    WAKER.call_once(|| {
        std::thread::Builder::new()
            .name("provider-latency".into())
            .spawn(wake_on_time)
            .expect("a thread for the provider's latency");
    });
    let (wake, woken) = oneshot::channel();
    let at = Instant::now() + duration;
    {
        let mut sleepers = SLEEPERS.lock().unwrap();
        let seq = sleepers.1;
        sleepers.1 += 1;
        let first = sleepers
            .0
            .first_key_value()
            .is_none_or(|(&(first, _), _)| at < first);
        sleepers.0.insert((at, seq), wake);
        if first {
            EARLIER.notify_one();
        }
    }
    let _ = woken.await;
}
