//! Rate limiting in front of the provider: a local GCRA (governor's, on
//! tokio time) for calls and/or keys, and an optional fleet-wide limiter
//! shared by every instance.
//!
//! # Where the wait happens
//!
//! A provider call waits for its permit (its call and its keys) right
//! before it is made. With leases, that is after the claim: only keys this
//! fill actually leased are paid for, and nothing (no connection, no lock)
//! is held while the budget is exhausted. A store that holds locks across
//! the provider (the held-transaction protocol) instead pays for the first
//! call before it locks anything
//! ([`Fill::prepay_first_call`](crate::store::Fill::prepay_first_call)); if
//! its re-read then finds every key filled by someone else, that permit
//! goes unused.
//!
//! A call that waits for its permit takes in the keys of calls that start
//! meanwhile ([`crate::merge`]); those keys are charged to a keys quota
//! once the permit is granted.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use tokio::time::Instant;

use crate::stats::Counters;
use crate::Error;

/// A rate: at most `count` per `period`, with a burst.
///
/// Enforced as a GCRA (generic cell rate algorithm): one unit is replenished
/// every `period / count`, and up to `burst` units may be taken at once. With
/// the default burst of 1 no window of length `period` ever sees more than
/// `count` units; with a burst `b`, a window can see up to `count + b - 1`.
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use loadlock::Quota;
///
/// let calls = Quota::per_second(NonZeroU32::new(10).unwrap());
/// let keys = Quota::per_period(NonZeroU32::new(6000).unwrap(), Duration::from_secs(60))
///     .unwrap()
///     .with_burst(NonZeroU32::new(100).unwrap());
/// assert_eq!(calls.emission_interval(), Duration::from_millis(100));
/// assert_eq!(keys.burst().get(), 100);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    count: NonZeroU32,
    period: Duration,
    burst: NonZeroU32,
}

impl Quota {
    /// At most `count` per second, burst 1.
    pub fn per_second(count: NonZeroU32) -> Quota {
        Quota {
            count,
            period: Duration::from_secs(1),
            burst: NonZeroU32::MIN,
        }
    }

    /// At most `count` per `period`, burst 1; `None` when `period` is zero
    /// or longer than a year.
    pub fn per_period(count: NonZeroU32, period: Duration) -> Option<Quota> {
        let year = Duration::from_secs(365 * 24 * 3600);
        (!period.is_zero() && period <= year).then_some(Quota {
            count,
            period,
            burst: NonZeroU32::MIN,
        })
    }

    /// The same rate, allowing up to `burst` units at once.
    #[must_use]
    pub fn with_burst(self, burst: NonZeroU32) -> Quota {
        Quota { burst, ..self }
    }

    /// The units allowed per period.
    pub fn count(&self) -> NonZeroU32 {
        self.count
    }

    /// The period.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// The most units that may be taken at once.
    pub fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The time one unit takes to replenish: `period / count`, rounded up
    /// to a whole microsecond so that rounding never lets one more unit into
    /// a period.
    pub fn emission_interval(&self) -> Duration {
        let micros = self
            .period
            .as_micros()
            .div_ceil(u128::from(self.count.get()));
        Duration::from_micros(u64::try_from(micros).unwrap_or(u64::MAX))
    }

    /// The GCRA's tolerance: how far ahead of the rate a burst may go,
    /// `emission_interval * (burst - 1)`.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) fn tolerance(&self) -> Duration {
        self.emission_interval()
            .checked_mul(self.burst.get() - 1)
            .unwrap_or(Duration::MAX)
    }

    /// `None` when a full burst would span more than about 100 years (the
    /// limiter's clock would overflow).
    fn to_governor(self) -> Option<governor::Quota> {
        let century = Duration::from_secs(100 * 365 * 24 * 3600);
        let span = self.emission_interval().checked_mul(self.burst.get())?;
        if span > century {
            return None;
        }
        governor::Quota::with_period(self.emission_interval()).map(|q| q.allow_burst(self.burst))
    }
}

/// A clock on tokio time, so paused-time tests drive the limiter.
#[derive(Debug, Clone)]
struct TokioClock {
    start: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

type Gcra = governor::RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// A limiter shared by every instance of a fleet; see `PgRateLimit`.
#[async_trait::async_trait]
pub(crate) trait FleetLimiter: Send + Sync + fmt::Debug + 'static {
    /// Charges one call to `namespace`'s budget for its next free turn, and
    /// says when that is; while the namespace is paused (another instance
    /// was told to back off), charges nothing and says for how long.
    async fn reserve(&self, namespace: &str) -> Result<FleetTurn, Error>;
    /// How long the namespace is paused for by a provider's back-off, if it
    /// is.
    async fn paused_for(&self, namespace: &str) -> Result<Duration, Error>;
    /// Pauses the namespace for `delay` across the fleet.
    async fn pause(&self, namespace: &str, delay: Duration) -> Result<(), Error>;
}

/// A fleet budget's answer to a call (given by `PgRateLimit`, the one
/// fleet budget there is, so only with the `postgres` feature).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
pub(crate) enum FleetTurn {
    /// Charged: the call may go once this has passed (zero: now).
    In(Duration),
    /// Paused for this long; nothing charged.
    Paused(Duration),
}

/// The shortest wait for a turn of the fleet's budget that says it binds:
/// a shorter one is over before another instance could join the call.
const BINDING_WAIT: Duration = Duration::from_millis(2);

/// How long the fleet's budget is taken to bind after the turn of the
/// last call that waited [`BINDING_WAIT`] or more for it (or the end of a
/// pause).
#[cfg(feature = "postgres")]
const BINDS_FOR: Duration = Duration::from_secs(1);

/// Everything that limits provider calls of one cache.
pub(crate) struct Limiter {
    calls: Option<Gcra>,
    keys: Option<(Gcra, NonZeroU32)>,
    fleet: Option<Arc<dyn FleetLimiter>>,
    clock: TokioClock,
    /// The turn (microseconds on `clock`, plus one; 0: never) of the last
    /// call that waited [`BINDING_WAIT`] or more for it, or the end of the
    /// last pause.
    fleet_bound_at: AtomicU64,
}

impl fmt::Debug for Limiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limiter")
            .field("calls", &self.calls.is_some())
            .field("keys", &self.keys.is_some())
            .field("fleet", &self.fleet)
            .finish()
    }
}

/// A provider call paid for in advance; spent by the first call that takes
/// it from its [`Prepaid`] slot.
#[derive(Debug, Default)]
pub(crate) struct Prepaid {
    keys: Mutex<Option<usize>>,
}

impl Prepaid {
    /// Whether a prepaid permit covers `keys` keys.
    pub(crate) fn covers(&self, keys: usize) -> bool {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|paid| paid >= keys)
    }

    /// Takes the prepaid permit if it covers `keys` keys.
    fn take(&self, keys: usize) -> bool {
        let mut slot = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match *slot {
            Some(paid) if paid >= keys => {
                *slot = None;
                true
            }
            _ => false,
        }
    }
}

impl Limiter {
    /// Builds the limiter.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when the keys quota's burst is below
    /// `max_batch_size` (a full call could never be let through).
    pub(crate) fn new(
        calls: Option<Quota>,
        keys: Option<Quota>,
        fleet: Option<Arc<dyn FleetLimiter>>,
        max_batch_size: usize,
    ) -> Result<Self, Error> {
        let clock = TokioClock {
            start: Instant::now(),
        };
        let gcra = |quota: Quota| {
            quota
                .to_governor()
                .map(|q| governor::RateLimiter::direct_with_clock(q, clock.clone()))
                .ok_or_else(|| {
                    Error::config("a quota's burst spans more than 100 years of its rate")
                })
        };
        let keys = match keys {
            Some(quota) => {
                if (quota.burst.get() as usize) < max_batch_size {
                    return Err(Error::config(format!(
                        "the keys quota's burst ({}) must be at least max_batch_size ({max_batch_size})",
                        quota.burst
                    )));
                }
                Some((gcra(quota)?, quota.burst))
            }
            None => None,
        };
        Ok(Limiter {
            calls: calls.map(gcra).transpose()?,
            keys,
            fleet,
            clock,
            fleet_bound_at: AtomicU64::new(0),
        })
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn has_fleet(&self) -> bool {
        self.fleet.is_some()
    }

    /// Whether the fleet's budget binds: a call of this cache waited
    /// [`BINDING_WAIT`] or more for a turn (or was paused) that came, or
    /// comes, less than [`BINDS_FOR`] ago.
    #[cfg(feature = "postgres")]
    pub(crate) fn fleet_binds(&self) -> bool {
        match self.fleet_bound_at.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let since = Duration::from_micros(at - 1);
                self.clock.now().saturating_sub(since) < BINDS_FOR
            }
        }
    }

    /// Records a wait of `wait` for a turn or the end of a pause.
    fn fleet_bound(&self, wait: Duration) {
        let until = self.clock.now().saturating_add(wait).as_micros();
        let until = u64::try_from(until).unwrap_or(u64::MAX - 1);
        self.fleet_bound_at.fetch_max(until + 1, Ordering::Relaxed);
    }

    pub(crate) fn is_unlimited(&self) -> bool {
        self.calls.is_none() && self.keys.is_none() && self.fleet.is_none()
    }

    /// Waits until one call of `keys` keys may be made, and charges it. A
    /// call that had to wait counts once in `rate_limited_waits`. A call
    /// that waits for a turn of the fleet's budget is let go up to `ahead`
    /// before it (after the pause it honours was read): returns when the
    /// call may start, which it must not do before.
    pub(crate) async fn acquire(
        &self,
        namespace: &str,
        keys: usize,
        counters: &Counters,
        ahead: Duration,
    ) -> Result<Instant, Error> {
        let mut waited = false;
        let mut turn = Instant::now();
        if let Some(gcra) = &self.calls {
            waited |= self.wait_local(gcra, NonZeroU32::MIN, namespace).await?;
        }
        if let Some((gcra, burst)) = &self.keys {
            let n = u32::try_from(keys)
                .ok()
                .and_then(NonZeroU32::new)
                .map_or(NonZeroU32::MIN, |n| n.min(*burst));
            waited |= self.wait_local(gcra, n, namespace).await?;
        }
        if let Some(fleet) = &self.fleet {
            loop {
                match fleet.reserve(namespace).await? {
                    FleetTurn::In(wait) if wait.is_zero() => break,
                    FleetTurn::In(wait) => {
                        waited = true;
                        if wait >= BINDING_WAIT {
                            self.fleet_bound(wait);
                        }
                        Self::trace_wait(namespace, wait, "fleet rate limit");
                        turn = Instant::now() + wait;
                        tokio::time::sleep_until(turn - ahead.min(wait)).await;
                        // A pause recorded while this call waited for its
                        // turn holds it too; the turn is then given up (going
                        // after the pause on a turn taken before it would
                        // add to the calls the budget lets through then).
                        if !Self::wait_out_pause(fleet.as_ref(), namespace).await? {
                            break;
                        }
                    }
                    FleetTurn::Paused(wait) => {
                        waited = true;
                        self.fleet_bound(wait);
                        Self::trace_wait(namespace, wait, "fleet paused");
                        tokio::time::sleep(wait).await;
                    }
                }
            }
        }
        if waited {
            Counters::add(&counters.rate_limited_waits, 1);
        }
        Ok(turn)
    }

    /// Pays for the first call of a fill before it takes anything, into
    /// `slot`.
    pub(crate) async fn prepay(
        &self,
        namespace: &str,
        keys: usize,
        slot: &Prepaid,
        counters: &Counters,
    ) -> Result<(), Error> {
        if self.is_unlimited() {
            return Ok(());
        }
        let turn = self
            .acquire(namespace, keys, counters, Duration::ZERO)
            .await?;
        tokio::time::sleep_until(turn).await;
        *slot.keys.lock().unwrap_or_else(|e| e.into_inner()) = Some(keys);
        Ok(())
    }

    /// Before a call: spends the prepaid permit (then only honours a fleet
    /// pause recorded since), or acquires a new one (let go up to `ahead`
    /// of a fleet turn, see [`acquire`](Self::acquire)); returns when the
    /// call may start.
    pub(crate) async fn before_call(
        &self,
        namespace: &str,
        keys: usize,
        prepaid: &Prepaid,
        counters: &Counters,
        ahead: Duration,
    ) -> Result<Instant, Error> {
        if !prepaid.take(keys) {
            return self.acquire(namespace, keys, counters, ahead).await;
        }
        if let Some(fleet) = &self.fleet {
            if Self::wait_out_pause(fleet.as_ref(), namespace).await? {
                // The permit was paid before the pause; spending it now
                // would add to the calls the budget lets through after it.
                return self.acquire(namespace, keys, counters, ahead).await;
            }
        }
        Ok(Instant::now())
    }

    /// Waits until the fleet is not paused for `namespace`; returns whether
    /// it was.
    async fn wait_out_pause(fleet: &dyn FleetLimiter, namespace: &str) -> Result<bool, Error> {
        let mut waited = false;
        loop {
            let paused = fleet.paused_for(namespace).await?;
            if paused.is_zero() {
                return Ok(waited);
            }
            waited = true;
            Self::trace_wait(namespace, paused, "fleet paused");
            tokio::time::sleep(paused).await;
        }
    }

    /// Charges `keys` more keys to the keys quota, if there is one: the keys
    /// that joined a call after its permit was counted.
    pub(crate) async fn charge_keys(&self, namespace: &str, keys: usize) -> Result<(), Error> {
        if let Some((gcra, burst)) = &self.keys {
            let n = u32::try_from(keys)
                .ok()
                .and_then(NonZeroU32::new)
                .map_or(NonZeroU32::MIN, |n| n.min(*burst));
            self.wait_local(gcra, n, namespace).await?;
        }
        Ok(())
    }

    /// Tells the fleet that the provider asked to back off for `delay`.
    pub(crate) async fn pause_fleet(&self, namespace: &str, delay: Duration) -> Result<(), Error> {
        match &self.fleet {
            Some(fleet) => fleet.pause(namespace, delay).await,
            None => Ok(()),
        }
    }

    /// Waits for `n` units of `gcra`; returns whether it had to wait.
    async fn wait_local(&self, gcra: &Gcra, n: NonZeroU32, namespace: &str) -> Result<bool, Error> {
        let mut waited = false;
        loop {
            match gcra.check_n(n) {
                Ok(Ok(())) => return Ok(waited),
                Ok(Err(not_until)) => {
                    let wait = not_until.wait_time_from(self.clock.now());
                    waited = true;
                    Self::trace_wait(namespace, wait, "local rate limit");
                    tokio::time::sleep(wait).await;
                }
                Err(_) => {
                    // Excluded by `new`: n never exceeds the burst.
                    return Err(Error::config(
                        "a call needs more keys than the quota's burst",
                    ));
                }
            }
        }
    }

    fn trace_wait(namespace: &str, wait: Duration, why: &'static str) {
        tracing::debug!(
            namespace,
            wait_ms = wait.as_millis() as u64,
            why,
            "waiting for the provider's budget"
        );
    }
}
