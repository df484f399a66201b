//! The store conformance suite: every [`Store`] must pass these, through the
//! public `Cache` API, with several caches standing for several instances.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use loadlock::{Cache, Error, Store};
use tokio::sync::Barrier;

use super::{value_of, Fake};

type P = Fake<String>;

fn cache<S: Store<P> + Clone>(store: &S, provider: &P, ttl: Duration) -> Cache<P> {
    Cache::builder(provider.clone())
        .store(store.clone())
        .ttl(ttl)
        .negative_ttl(ttl)
        .build()
        .expect("valid settings")
}

fn keys(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("k{i}")).collect()
}

/// A value filled by one instance is a store hit for another.
pub async fn fill_then_hit<S: Store<P> + Clone>(store: S, namespace: &str) {
    let provider = Fake::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));

    let got = a.loader().load_many(keys(0..2)).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got["k1"], value_of(&"k1"));
    assert_eq!(provider.calls(), vec![keys(0..2)]);

    let got = b.loader().load_many(keys(0..2)).await.unwrap();
    assert_eq!(got["k0"], value_of(&"k0"));
    assert_eq!(
        provider.call_count(),
        1,
        "the second instance must hit the store"
    );
    let stats = b.stats();
    assert_eq!(
        (stats.loads, stats.store_hits, stats.provider_keys),
        (2, 2, 0)
    );
    assert_eq!(stats.hit_ratio(), 1.0);
}

/// A key the provider does not have is `None`, and the negative entry is
/// served to other instances without a provider call.
pub async fn negative_entries<S: Store<P> + Clone>(store: S, namespace: &str) {
    let provider = Fake::builder(namespace)
        .not_found(["gone".to_string()])
        .build();
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));

    assert_eq!(a.loader().load("gone".into()).await.unwrap(), None);
    let many = a
        .loader()
        .load_many(["gone".to_string(), "here".to_string()])
        .await
        .unwrap();
    assert_eq!(many.len(), 1);
    assert_eq!(many["here"], value_of(&"here"));

    assert_eq!(b.loader().load("gone".into()).await.unwrap(), None);
    assert_eq!(provider.fetches_per_key()["gone"], 1);
    assert_eq!(b.stats().negative_hits, 1);
    assert_eq!(b.stats().store_hits, 1);
}

/// Instances sharing the store, loading the same keys at the same moment,
/// fetch each key exactly once between them. Needs a multi-thread runtime.
pub async fn exactly_once_between_instances<S: Store<P> + Clone>(store: S, namespace: &str) {
    const INSTANCES: usize = 4;
    const LOADERS: usize = 16;
    let provider = Fake::builder(namespace)
        .delay(Duration::from_millis(20))
        .build();
    let caches: Vec<_> = (0..INSTANCES)
        .map(|_| cache(&store, &provider, Duration::from_secs(60)))
        .collect();
    let barrier = Arc::new(Barrier::new(INSTANCES * LOADERS));
    let mut tasks = Vec::new();
    for (i, cache) in caches.iter().enumerate() {
        for j in 0..LOADERS {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            // Each loader asks for the same 50 keys, in its own order.
            let mut wanted = keys(0..50);
            wanted.rotate_left((i * LOADERS + j) % 50);
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                cache.loader().load_many(wanted).await
            }));
        }
    }
    for result in join_all(tasks).await {
        let got = result.expect("task").expect("load");
        assert_eq!(got.len(), 50);
        assert_eq!(got["k7"], value_of(&"k7"));
    }
    let per_key = provider.fetches_per_key();
    assert_eq!(per_key.len(), 50);
    assert!(
        per_key.values().all(|&n| n == 1),
        "some key fetched twice: {per_key:?}"
    );
    let fetched: u64 = caches.iter().map(|c| c.stats().provider_keys).sum();
    assert_eq!(fetched, 50);
    assert!(caches.iter().all(|c| c.stats().in_flight == 0));
}

/// A failed provider call caches nothing: the next load asks again.
pub async fn failure_caches_nothing<S: Store<P> + Clone>(store: S, namespace: &str) {
    let provider = Fake::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    provider.fail_next(1);
    let err = a.loader().load_many(keys(0..3)).await.unwrap_err();
    assert!(matches!(err, Error::Provider { .. }), "{err:?}");

    let got = a.loader().load_many(keys(0..3)).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(provider.calls(), vec![keys(0..3), keys(0..3)]);
}

/// Entries of one namespace are invisible to another.
pub async fn namespaces_are_isolated<S: Store<P> + Clone>(store: S, namespace: &str) {
    let first = Fake::new(format!("{namespace}/a"));
    let second = Fake::new(format!("{namespace}/b"));
    let a = cache(&store, &first, Duration::from_secs(60));
    let b = cache(&store, &second, Duration::from_secs(60));
    a.loader().load("shared".into()).await.unwrap();
    b.loader().load("shared".into()).await.unwrap();
    assert_eq!(first.call_count(), 1);
    assert_eq!(second.call_count(), 1);
}

/// Keys with quotes, backslashes, separators, unicode, and 1 KB of length are
/// stored and found again under their exact form.
pub async fn odd_keys_round_trip<S: Store<P> + Clone>(store: S, namespace: &str) {
    let odd = vec![
        "it's".to_string(),
        "say \"hi\"".to_string(),
        r"back\slash\\".to_string(),
        "ünïcødé ✓ 鍵".to_string(),
        "with:colon/and,comma".to_string(),
        "x".repeat(1024),
        String::new(),
    ];
    let provider = Fake::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));
    let got = a.loader().load_many(odd.clone()).await.unwrap();
    for key in &odd {
        assert_eq!(got[key], value_of(key));
    }
    let got = b.loader().load_many(odd.clone()).await.unwrap();
    for key in &odd {
        assert_eq!(got[key], value_of(key));
    }
    assert_eq!(provider.keys_fetched(), odd.len());
    assert_eq!(b.stats().store_hits, odd.len() as u64);
}

/// An entry is fresh for its TTL and fetched again after it; `pass` lets the
/// store's clock move past a duration (paused tokio time, or real time).
pub async fn entries_expire<S, W, Fut>(store: S, namespace: &str, ttl: Duration, pass: W)
where
    S: Store<P> + Clone,
    W: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let provider = Fake::builder(namespace)
        .not_found(["gone".to_string()])
        .build();
    let a = cache(&store, &provider, ttl);
    let wanted = vec!["here".to_string(), "gone".to_string()];
    a.loader().load_many(wanted.clone()).await.unwrap();
    pass(ttl / 2).await;
    a.loader().load_many(wanted.clone()).await.unwrap();
    assert_eq!(provider.call_count(), 1, "fresh within the TTL");
    pass(ttl).await;
    let got = a.loader().load_many(wanted.clone()).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(provider.calls(), vec![wanted.clone(), wanted]);
}
