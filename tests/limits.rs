//! Rate limits, retries, timeouts and chunk concurrency with an in-process
//! provider, on paused tokio time: the limiter sleeps on tokio time, so these
//! run instantly and exactly.

mod support;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loadlock::{BatchFetch, Cache, Error, ErrorClass, Quota, RetryPolicy};
use support::Fake;
use tokio::time::Instant;

fn n(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value).unwrap()
}

/// A provider that records when each call started (tokio time) and fails
/// the first `fail` calls with the given class.
#[derive(Clone)]
struct Scripted {
    started: Arc<Mutex<Vec<(Instant, usize)>>>,
    fail: Arc<AtomicUsize>,
    class: ErrorClass,
    delay: Duration,
}

impl Scripted {
    fn new(fail: usize, class: ErrorClass) -> Self {
        Scripted {
            started: Arc::default(),
            fail: Arc::new(AtomicUsize::new(fail)),
            class,
            delay: Duration::ZERO,
        }
    }

    fn call_times(&self, origin: Instant) -> Vec<Duration> {
        self.started
            .lock()
            .unwrap()
            .iter()
            .map(|(t, _)| t.duration_since(origin))
            .collect()
    }
}

#[derive(Debug)]
struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("refused")
    }
}

impl std::error::Error for Refused {}

#[async_trait::async_trait]
impl BatchFetch for Scripted {
    type Key = u64;
    type Value = u64;
    type Error = Refused;

    fn namespace(&self) -> &str {
        "limits/scripted"
    }

    fn max_batch_size(&self) -> usize {
        100
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Refused> {
        self.started
            .lock()
            .unwrap()
            .push((Instant::now(), keys.len()));
        tokio::time::sleep(self.delay).await;
        let failing = self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failing {
            return Err(Refused);
        }
        Ok(keys.iter().map(|&k| (k, k)).collect())
    }

    fn classify(&self, _: &Refused) -> ErrorClass {
        self.class
    }
}

#[tokio::test(start_paused = true)]
async fn calls_quota_spaces_calls_on_tokio_time() {
    let provider = Scripted::new(0, ErrorClass::Permanent);
    let cache = Cache::builder(provider.clone())
        .rate_limit_calls(Quota::per_second(n(4)))
        .build()
        .unwrap();
    let origin = Instant::now();
    // One at a time: loads that wait together share a call (below).
    for k in 0..6u64 {
        cache.loader().load(k).await.unwrap();
    }
    let times = provider.call_times(origin);
    assert_eq!(times.len(), 6);
    for pair in times.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(250), "{times:?}");
        assert!(
            gap < Duration::from_millis(260),
            "no more waiting than needed: {times:?}"
        );
    }
    assert_eq!(cache.stats().rate_limited_waits, 5);
}

#[tokio::test(start_paused = true)]
async fn loads_waiting_for_the_budget_share_full_calls() {
    let provider = Scripted::new(0, ErrorClass::Permanent);
    let cache = Cache::builder(provider.clone())
        .rate_limit_calls(Quota::per_second(n(4)))
        .build()
        .unwrap();
    let origin = Instant::now();
    // 250 requests, each its own loader and fill, all at once.
    let loads: Vec<_> = (0..250u64)
        .map(|k| {
            let cache = cache.clone();
            tokio::spawn(async move { (k, cache.loader().load(k).await) })
        })
        .collect();
    for load in loads {
        let (k, got) = load.await.unwrap();
        assert_eq!(got.unwrap(), Some(k));
    }
    let calls = provider.started.lock().unwrap().clone();
    let keys: Vec<usize> = calls.iter().map(|&(_, keys)| keys).collect();
    assert_eq!(
        keys.iter().sum::<usize>(),
        250,
        "each key asked once: {keys:?}"
    );
    assert!(keys.iter().all(|&k| k <= 100), "{keys:?}");
    // The budget buys full calls: the first goes at once, the rest wait
    // together, at most 100 keys each.
    assert!(calls.len() <= 5, "{keys:?}");
    for pair in calls.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(250),
            "{calls:?}"
        );
    }
    assert!(
        origin.elapsed() < Duration::from_millis(1300),
        "{:?}",
        origin.elapsed()
    );
    let stats = cache.stats();
    assert_eq!(stats.provider_calls, calls.len() as u64);
    assert_eq!(stats.merged_calls, 250 - calls.len() as u64);
}

#[tokio::test(start_paused = true)]
async fn keys_that_share_a_call_are_charged_to_the_keys_quota() {
    let provider = Scripted::new(0, ErrorClass::Permanent);
    // 100 keys per second, a whole call at once.
    let cache = Cache::builder(provider.clone())
        .rate_limit_keys(Quota::per_second(n(100)).with_burst(n(100)))
        .build()
        .unwrap();
    let origin = Instant::now();
    let loads: Vec<_> = (0..300u64)
        .map(|k| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load(k).await })
        })
        .collect();
    for load in loads {
        load.await.unwrap().unwrap();
    }
    let calls = provider.call_times(origin);
    let keys: Vec<usize> = provider
        .started
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.1)
        .collect();
    assert_eq!(keys.iter().sum::<usize>(), 300);
    assert!(calls.len() < 300, "some loads shared a call: {keys:?}");
    // By any call, no more keys than the quota allows by then.
    let mut asked = 0;
    for (at, n) in calls.iter().zip(&keys) {
        asked += n;
        let allowed = 100.0 + 100.0 * at.as_secs_f64() + 1.0;
        assert!(
            asked as f64 <= allowed,
            "{asked} keys by {at:?}: {calls:?} {keys:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn keys_quota_meters_keys_not_calls() {
    let provider = Scripted::new(0, ErrorClass::Permanent);
    // 100 keys per second, a whole call (100 keys) at once.
    let quota = Quota::per_second(n(100)).with_burst(n(100));
    let cache = Cache::builder(provider.clone())
        .rate_limit_keys(quota)
        .build()
        .unwrap();
    let origin = Instant::now();
    cache.loader().load_many(0..300).await.unwrap();
    let times = provider.call_times(origin);
    assert_eq!(times.len(), 3);
    let ms = Duration::from_millis;
    assert!(times[0] < ms(10), "{times:?}");
    assert!(times[1] >= ms(1000) && times[1] < ms(1100), "{times:?}");
    assert!(times[2] >= ms(2000) && times[2] < ms(2100), "{times:?}");
}

#[tokio::test]
async fn keys_quota_burst_must_hold_a_full_call() {
    let err = Cache::builder(Fake::<u64>::new("limits/burst"))
        .rate_limit_keys(Quota::per_second(n(1000)))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("max_batch_size"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn transient_errors_back_off_exponentially() {
    let provider = Scripted::new(3, ErrorClass::Transient);
    let cache = Cache::builder(provider.clone())
        .retry(
            RetryPolicy::default()
                .with_max_attempts(n(4))
                .with_backoff(Duration::from_millis(100), Duration::from_secs(10))
                .with_jitter(false),
        )
        .build()
        .unwrap();
    let origin = Instant::now();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    let times = provider.call_times(origin);
    let gaps: Vec<Duration> = times.windows(2).map(|p| p[1] - p[0]).collect();
    // 100, 200, 400 ms (tokio's timer rounds each sleep up to its 1 ms tick).
    for (gap, expected) in gaps.iter().zip([100u64, 200, 400]) {
        let expected = Duration::from_millis(expected);
        assert!(
            *gap >= expected && *gap <= expected + Duration::from_millis(5),
            "{gaps:?}"
        );
    }
    assert_eq!(cache.stats().provider_retries, 3);
}

/// Rate-limited answers are not failed attempts: they are waited out (the
/// backoff, without a `Retry-After`) until the rate-limit deadline, and only
/// then does the load fail, with `Error::RateLimited`.
#[tokio::test(start_paused = true)]
async fn rate_limited_without_retry_after_backs_off_until_the_deadline() {
    let provider = Scripted::new(usize::MAX, ErrorClass::RateLimited { retry_after: None });
    let cache = Cache::builder(provider.clone())
        .retry(
            RetryPolicy::default()
                .with_max_attempts(n(3))
                .with_backoff(Duration::from_millis(100), Duration::from_secs(10))
                .with_jitter(false)
                .with_rate_limit_deadline(Duration::from_secs(2)),
        )
        .build()
        .unwrap();
    let origin = Instant::now();
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    // Waits of 100, 200, 400 and 800 ms fit in 2 s; the next, 1.6 s, not.
    let times = provider.call_times(origin);
    assert_eq!(times.len(), 5, "more calls than attempts: {times:?}");
    assert!(
        origin.elapsed() < Duration::from_secs(2),
        "{:?}",
        origin.elapsed()
    );
    assert_eq!(cache.stats().rate_limited_waits, 4);
    // Nothing cached.
    provider.fail.store(0, Ordering::SeqCst);
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
}

/// A provider that asks for short waits many times over is waited out,
/// however few attempts the policy allows for failures.
#[tokio::test(start_paused = true)]
async fn short_retry_afters_are_waited_out_beyond_the_attempts() {
    // 50 answers in a row asking for 5 ms: 250 ms, within the deadline.
    let provider = Scripted::new(
        50,
        ErrorClass::RateLimited {
            retry_after: Some(Duration::from_millis(5)),
        },
    );
    let cache = Cache::builder(provider.clone())
        .retry(RetryPolicy::default().with_max_attempts(n(2)))
        .build()
        .unwrap();
    let origin = Instant::now();
    assert_eq!(cache.loader().load(1).await.unwrap(), Some(1));
    assert_eq!(provider.started.lock().unwrap().len(), 51);
    assert!(
        origin.elapsed() >= Duration::from_millis(250),
        "{:?}",
        origin.elapsed()
    );
    assert_eq!(cache.stats().rate_limited_waits, 50);
    assert_eq!(cache.stats().provider_retries, 50);
}

#[tokio::test(start_paused = true)]
async fn short_retry_afters_fail_the_load_past_the_deadline() {
    let provider = Scripted::new(
        usize::MAX,
        ErrorClass::RateLimited {
            retry_after: Some(Duration::from_millis(5)),
        },
    );
    let cache = Cache::builder(provider.clone())
        .retry(
            RetryPolicy::default()
                .with_max_attempts(n(2))
                .with_rate_limit_deadline(Duration::from_millis(100)),
        )
        .build()
        .unwrap();
    let origin = Instant::now();
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(matches!(err, Error::RateLimited { .. }), "{err:?}");
    let calls = provider.started.lock().unwrap().len();
    // Waited out until the deadline (20 waits of 5 ms), not after 2 attempts.
    assert!((19..=22).contains(&calls), "{calls} calls");
    assert!(
        origin.elapsed() <= Duration::from_millis(110),
        "{:?}",
        origin.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_are_not_retried() {
    let provider = Scripted::new(1, ErrorClass::Permanent);
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(err.provider_error::<Refused>().is_some());
    assert_eq!(provider.started.lock().unwrap().len(), 1);
    assert_eq!(cache.stats().provider_retries, 0);
}

#[tokio::test(start_paused = true)]
async fn a_slow_provider_times_out_on_every_attempt() {
    let mut provider = Scripted::new(0, ErrorClass::Permanent);
    provider.delay = Duration::from_secs(60);
    let cache = Cache::builder(provider.clone())
        .provider_timeout(Duration::from_secs(1))
        .retry(RetryPolicy::default().with_max_attempts(n(2)))
        .build()
        .unwrap();
    let origin = Instant::now();
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(matches!(err, Error::ProviderTimeout { .. }), "{err:?}");
    assert!(err.is_provider());
    assert!(
        origin.elapsed() < Duration::from_secs(5),
        "{:?}",
        origin.elapsed()
    );
    let stats = cache.stats();
    assert_eq!((stats.provider_calls, stats.provider_timeouts), (2, 2));
    assert_eq!(stats.in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn chunks_run_one_at_a_time_unless_told_otherwise() {
    for (concurrency, expected) in [(1, 4), (2, 2), (4, 1)] {
        let mut provider = Scripted::new(0, ErrorClass::Permanent);
        provider.delay = Duration::from_secs(1);
        let cache = Cache::builder(provider.clone())
            .chunk_concurrency(concurrency)
            .build()
            .unwrap();
        let origin = Instant::now();
        let got = cache.loader().load_many(0..400).await.unwrap();
        assert_eq!(got.len(), 400);
        let took = origin.elapsed();
        assert!(
            took >= Duration::from_secs(expected) && took < Duration::from_secs(expected + 1),
            "concurrency {concurrency}: {took:?}"
        );
        assert_eq!(provider.started.lock().unwrap().len(), 4);
    }
    let zero = Cache::builder(Scripted::new(0, ErrorClass::Permanent))
        .chunk_concurrency(0)
        .build();
    assert!(zero.is_err());
}
