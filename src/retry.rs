//! [`RetryPolicy`]: how often, and after how long, a failed provider call is
//! repeated.

use std::num::NonZeroU32;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// How failed provider calls are retried, per call (chunk).
///
/// * [`ErrorClass::Transient`](crate::ErrorClass::Transient) errors and
///   timeouts are retried after an exponential backoff with jitter, from
///   `min_delay` doubling up to `max_delay`.
/// * [`ErrorClass::RateLimited`](crate::ErrorClass::RateLimited) answers
///   are not failures: the call waits out the provider's `Retry-After` (the
///   backoff when it gave none) and tries again, for as long as the
///   `rate_limit_deadline` allows, counted from the first such answer of
///   the call. Past it, or at once when one `Retry-After` exceeds
///   `max_retry_after`, the load fails with
///   [`Error::RateLimited`](crate::Error::RateLimited). With a fleet-wide
///   limit, every such answer pauses every instance.
/// * Only transient errors and timeouts count against `max_attempts`
///   (calls in all, the first included); permanent errors fail at once.
///
/// All waits sleep on tokio time.
///
/// The cache's build checks that one call with all of this (every attempt
/// at the provider timeout, every backoff, the whole rate-limit deadline)
/// fits in the store's bound on a fill.
///
/// | setting | default |
/// |---|---|
/// | max attempts | 3 |
/// | backoff | 100 ms doubling to 2 s, with jitter |
/// | max retry-after | 10 s |
/// | rate-limit deadline | 30 s |
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_attempts: NonZeroU32,
    min_delay: Duration,
    max_delay: Duration,
    max_retry_after: Duration,
    rate_limit_deadline: Duration,
    jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_retry_after: Duration::from_secs(10),
            rate_limit_deadline: Duration::from_secs(30),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Never retry: every failure fails the load at once, and so does a
    /// rate-limited answer (a rate-limit deadline of zero).
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: NonZeroU32::MIN,
            rate_limit_deadline: Duration::ZERO,
            ..RetryPolicy::default()
        }
    }

    /// Calls in all, the first included.
    #[must_use]
    pub fn with_max_attempts(self, max_attempts: NonZeroU32) -> Self {
        RetryPolicy {
            max_attempts,
            ..self
        }
    }

    /// The exponential backoff between transient failures: `min` first,
    /// doubling up to `max`.
    #[must_use]
    pub fn with_backoff(self, min: Duration, max: Duration) -> Self {
        RetryPolicy {
            min_delay: min,
            max_delay: max.max(min),
            ..self
        }
    }

    /// Whether backoff delays are randomized (on by default, so instances
    /// that failed together do not retry together).
    #[must_use]
    pub fn with_jitter(self, jitter: bool) -> Self {
        RetryPolicy { jitter, ..self }
    }

    /// The longest `Retry-After` the cache waits out; a longer one fails the
    /// load with [`Error::RateLimited`](crate::Error::RateLimited).
    #[must_use]
    pub fn with_max_retry_after(self, max: Duration) -> Self {
        RetryPolicy {
            max_retry_after: max,
            ..self
        }
    }

    /// How long one call may keep waiting out rate-limited answers,
    /// counted from the first; past it the load fails with
    /// [`Error::RateLimited`](crate::Error::RateLimited).
    #[must_use]
    pub fn with_rate_limit_deadline(self, deadline: Duration) -> Self {
        RetryPolicy {
            rate_limit_deadline: deadline,
            ..self
        }
    }

    /// How long one call may keep waiting out rate-limited answers.
    pub fn rate_limit_deadline(&self) -> Duration {
        self.rate_limit_deadline
    }

    /// Calls in all, the first included.
    pub fn max_attempts(&self) -> NonZeroU32 {
        self.max_attempts
    }

    /// The longest `Retry-After` waited out.
    pub fn max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// The longest time the retries of one call can spend in backoffs after
    /// transient failures (jitter can double one); rate-limited waits
    /// aside (see [`rate_limit_deadline`](Self::rate_limit_deadline)).
    pub(crate) fn worst_case_waits(&self) -> Duration {
        let retries = self.max_attempts.get() - 1;
        self.max_delay
            .checked_mul(2)
            .and_then(|longest| longest.checked_mul(retries))
            .unwrap_or(Duration::MAX)
    }

    /// The delays between transient failures of one call.
    pub(crate) fn backoff(&self) -> impl Iterator<Item = Duration> {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .without_max_times();
        let builder = if self.jitter {
            builder.with_jitter()
        } else {
            builder
        };
        builder.build()
    }
}
