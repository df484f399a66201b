//! `MemoryStore`'s own behaviour (its conformance suite run is in
//! `conformance.rs`).

mod support;

use std::time::Duration;

use loadlock::{Cache, MemoryStore};
use support::Fake;

/// Negative entries have their own TTL: no second call within it, one after.
#[tokio::test(start_paused = true)]
async fn negative_ttl_is_separate() {
    let provider = Fake::builder("mem/negttl").not_found([404u64]).build();
    let cache = Cache::builder(provider.clone())
        .ttl(Duration::from_secs(600))
        .negative_ttl(Duration::from_secs(10))
        .build()
        .unwrap();

    assert_eq!(cache.loader().load(404).await.unwrap(), None);
    assert_eq!(
        cache.loader().load(1).await.unwrap().as_deref(),
        Some("v:1")
    );
    tokio::time::advance(Duration::from_secs(9)).await;
    assert_eq!(cache.loader().load(404).await.unwrap(), None);
    assert_eq!(provider.call_count(), 2, "negative entry fresh for 10 s");
    assert_eq!(cache.stats().negative_hits, 1);

    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(cache.loader().load(404).await.unwrap(), None);
    assert_eq!(provider.calls(), vec![vec![404], vec![1], vec![404]]);

    // The value's own TTL (600 s) has not run out.
    cache.loader().load(1).await.unwrap();
    assert_eq!(provider.call_count(), 3);
}

/// Expired entries are swept: `purge_expired` drops them, and an unbounded
/// store never grows past what is fresh plus one sweep interval.
#[tokio::test(start_paused = true)]
async fn expired_entries_are_swept() {
    let store = MemoryStore::unbounded();
    let provider = Fake::<u64>::new("mem/sweep");
    let cache = Cache::builder(provider)
        .store(store.clone())
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    cache.loader().load_many(0..100).await.unwrap();
    assert_eq!(store.len(), 100);
    assert_eq!(store.purge_expired(), 0);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(store.purge_expired(), 100);
    assert!(store.is_empty());

    // Lazy sweeping: 20 rounds of 1,000 fresh keys, each expiring before
    // the next round, never leave more than two rounds' worth behind.
    for round in 0..20u64 {
        cache
            .loader()
            .load_many(round * 1000..(round + 1) * 1000)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        // The sweep runs on a task of its own.
        tokio::task::yield_now().await;
        assert!(store.len() <= 2048 + 1000, "{} entries", store.len());
    }
}

/// A bounded store keeps at most its capacity, whatever passes through it;
/// an evicted key is a miss, fetched again, with a newer version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_store_keeps_at_most_its_capacity() {
    let store = MemoryStore::with_capacity(1_000);
    assert_eq!(store.capacity(), Some(1_000));
    assert_eq!(
        MemoryStore::new().capacity(),
        Some(loadlock::store::DEFAULT_CAPACITY)
    );
    assert_eq!(MemoryStore::unbounded().capacity(), None);
    let provider = Fake::<u64>::new("mem/bounded");
    let cache = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let first = cache.loader().load_entry(0).await.unwrap().unwrap();
    for round in 1..=20u64 {
        cache
            .loader()
            .load_many(round * 1000..(round + 1) * 1000)
            .await
            .unwrap();
        assert!(store.len() <= 1_000, "{} entries", store.len());
    }
    assert_eq!(cache.stats().in_flight, 0);
    // At most 1,000 of these are held: the rest are misses, fetched again.
    let before = provider.keys_fetched();
    cache.loader().load_many(0..2_000).await.unwrap();
    assert!(provider.keys_fetched() - before >= 1_000);
    let fetches = provider.fetches_per_key();
    let refetched = (0..2_000u64)
        .find(|k| fetches.get(k).copied().unwrap_or(0) >= 2)
        .expect("a key fetched again");
    let again = cache.loader().load_entry(refetched).await.unwrap().unwrap();
    assert!(again.version > first.version, "versions only grow");
}

/// A fill whose provider call fails releases its leases at once (see
/// `support::a_failed_fill_releases_its_leases_at_once`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fill_releases_its_leases_at_once() {
    let store = MemoryStore::new();
    support::a_failed_fill_releases_its_leases_at_once(store.clone(), store, "mem/release").await;
}

/// A fill that fails in a later round fails only the keys of that round:
/// what it published before is answered. Here the fill of 2 and 3 publishes
/// 3, waits for 2 (leased by another fill, which fails and releases it),
/// claims 2, and its own call for 2 fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fill_failing_in_a_later_round_keeps_what_it_published() {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    let provider = Fake::<u64>::builder("mem/later-round")
        .gate(gate.clone())
        .build();
    let store = MemoryStore::new();
    let a = Cache::builder(provider.clone())
        .store(store.clone())
        .retry(loadlock::RetryPolicy::none())
        .build()
        .unwrap();
    let b = Cache::builder(provider.clone())
        .store(store)
        .retry(loadlock::RetryPolicy::none())
        .build()
        .unwrap();
    let calls = |n: usize| {
        let provider = provider.clone();
        async move {
            while provider.call_count() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let first = tokio::spawn(async move { a.loader().load_many([1, 2]).await });
    calls(1).await;
    let second = tokio::spawn(async move {
        let loader = b.loader();
        tokio::join!(loader.load(2), loader.load(3))
    });
    calls(2).await;
    // The first fill fails and releases 1 and 2.
    provider.fail_next(1);
    gate.add_permits(1);
    assert!(first.await.unwrap().is_err());
    // The second fill's call for 3 answers; it then claims 2, and fails.
    gate.add_permits(1);
    calls(3).await;
    provider.fail_next(1);
    gate.add_permits(1);
    let (two, three) = second.await.unwrap();
    assert_eq!(provider.calls(), vec![vec![1, 2], vec![3], vec![2]]);
    assert_eq!(three.unwrap(), Some(support::value_of(&3)));
    assert!(two.unwrap_err().is_provider());
}
