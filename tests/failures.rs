//! Provider errors and panics: every waiter gets the error, nothing is cached,
//! nobody hangs.

mod support;

use std::error::Error as _;
use std::time::Duration;

use futures::future::join_all;
use loadlock::{Cache, Error, RetryPolicy};
use support::{value_of, Fake, FakeError, KeyError, PerKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn provider_error_fails_the_whole_batch_and_is_not_cached() {
    let provider = Fake::<u64>::builder("fail/error")
        .delay(Duration::from_millis(20))
        .build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    provider.fail_next(1);

    // One batch: three keys in one loader, plus a second loader joining key 1.
    let loader = cache.loader();
    let other = cache.loader();
    // Joins once the first loader's keys are in flight (a fixed sleep raced
    // the first batch on a loaded machine).
    let joiner = async {
        while cache.stats().in_flight == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        other.load(1).await
    };
    let (a, b, c, joined) = tokio::join!(loader.load(1), loader.load(2), loader.load(3), joiner);
    for result in [a, b, c, joined] {
        let err = result.unwrap_err();
        assert!(matches!(err, Error::Provider { .. }), "{err:?}");
        assert!(err.is_provider());
        let source = err.source().expect("provider error kept as source");
        assert_eq!(source.to_string(), "fake provider error: told to fail");
        assert_eq!(
            err.provider_error::<FakeError>(),
            Some(&FakeError("told to fail".into()))
        );
    }
    assert_eq!(provider.call_count(), 1);
    assert_eq!(cache.stats().coalesced, 1);
    assert_eq!(cache.stats().errors, 4);

    // The same loader retries: the failure was not memoized.
    assert_eq!(loader.load(1).await.unwrap(), Some(value_of(&1)));
    assert_eq!(provider.calls(), vec![vec![1, 2, 3], vec![1]]);
    assert_eq!(cache.stats().in_flight, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_chunk_fails_the_batch() {
    let provider = Fake::<u64>::builder("fail/chunk").max_batch(2).build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    provider.fail_next(1);
    let err = cache.loader().load_many([1, 2, 3, 4]).await.unwrap_err();
    assert!(matches!(err, Error::Provider { .. }));
    // Nothing from the chunk that succeeded was cached either.
    cache.loader().load_many([1, 2, 3, 4]).await.unwrap();
    assert_eq!(provider.fetches_per_key()[&1], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn panicking_provider_fails_every_waiter_and_recovers() {
    let provider = Fake::<u64>::builder("fail/panic")
        .delay(Duration::from_millis(5))
        .build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    provider.panic_next(1);

    let loaders: Vec<_> = (0..10).map(|_| cache.loader()).collect();
    let results = join_all(loaders.iter().map(|l| l.load_many([1, 2, 3]))).await;
    for result in results {
        match result.unwrap_err() {
            Error::ProviderPanicked { message, namespace } => {
                assert_eq!(&*message, "fake provider told to panic");
                assert_eq!(&*namespace, "fail/panic");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(cache.stats().in_flight, 0);

    let got = cache.loader().load_many([1, 2, 3]).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(provider.call_count(), 2);
}

#[tokio::test]
async fn errors_display_clearly() {
    let provider = Fake::<u64>::new("fail/display");
    let cache = Cache::builder(provider.clone()).build().unwrap();
    provider.fail_next(1);
    let err = cache.loader().load(1).await.unwrap_err();
    assert_eq!(err.to_string(), "provider `fail/display` failed");
    let cfg = Cache::builder(provider)
        .ttl(Duration::ZERO)
        .build()
        .unwrap_err();
    assert_eq!(
        cfg.to_string(),
        "invalid configuration: ttl must be greater than zero"
    );
    assert!(!cfg.is_provider());
}

/// A load started outside any tokio runtime fails with `Error::NoRuntime`
/// (its batch would have nowhere to run); it never panics, and a load from
/// within a runtime afterwards works.
#[test]
fn loading_outside_a_runtime_is_an_error() {
    let provider = Fake::<u64>::new("fail/no-runtime");
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let loader = cache.loader();
    let outside = futures::executor::block_on(loader.load(1));
    assert!(matches!(outside, Err(Error::NoRuntime)), "{outside:?}");
    let many = futures::executor::block_on(loader.load_many([2, 3]));
    assert!(matches!(many, Err(Error::NoRuntime)), "{many:?}");
    assert_eq!(provider.call_count(), 0);
    assert_eq!(cache.stats().in_flight, 0);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let inside = runtime.block_on(loader.load(1)).unwrap();
    assert_eq!(inside, Some(value_of(&1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_the_provider_fails_alone_fail_alone() {
    let provider = PerKey::new("fail/per-key", [7, 42, 99], []);
    let cache = Cache::builder(provider.clone()).build().unwrap();
    support::three_keys_of_a_hundred_fail(&cache, &provider).await;
}

#[tokio::test(start_paused = true)]
async fn a_key_failed_by_a_blip_is_asked_again_alone() {
    let provider = PerKey::new("fail/per-key-blip", [], [(5, 2)]);
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let got = cache.loader().load_many(0..10).await.unwrap();
    assert_eq!(got.len(), 10);
    assert_eq!(provider.calls(), vec![(0..10).collect(), vec![5], vec![5]]);
    assert_eq!(cache.stats().provider_retries, 2);

    // Out of attempts: the key fails, the others of its call do not.
    let provider = PerKey::new("fail/per-key-blips", [], [(5, 5)]);
    let cache = Cache::builder(provider.clone())
        .retry(RetryPolicy::default().with_max_attempts(std::num::NonZeroU32::new(2).unwrap()))
        .build()
        .unwrap();
    let loader = cache.loader();
    let (five, six) = tokio::join!(loader.load(5), loader.load(6));
    assert_eq!(six.unwrap(), Some(value_of(&6u64)));
    let err = five.unwrap_err();
    assert_eq!(err.provider_error::<KeyError>(), Some(&KeyError::Blip(5)));
    assert_eq!(provider.calls(), vec![vec![5, 6], vec![5]]);
}
