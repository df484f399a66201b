//! The conformance suite of [`Store`]: what every store must do, checked
//! through the public [`Cache`] API with several caches standing for
//! several instances. Enable the `testing` feature and run it against your
//! own store in your tests:
//!
//! ```
//! # async fn run() {
//! use loadlock::MemoryStore;
//!
//! // In a #[tokio::test(flavor = "multi_thread")]:
//! loadlock::testing::check_store(MemoryStore::new(), "conformance/memory").await;
//! # }
//! ```
//!
//! Each check panics, with what went wrong, when the store breaks an
//! obligation of [`Store`]; give each run a namespace of its own. The
//! checks need a multi-thread tokio runtime (instances load concurrently).
//! [`entries_expire`] also needs a way to move the store's clock (paused
//! tokio time for a store on tokio's clock, real time for a database).
//!
//! What a black-box check cannot see is spelled out on [`Store`]: above
//! all, calling [`Fill::about_to_commit`](crate::store::Fill::about_to_commit)
//! before a fill's writes become visible.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::join_all;
use tokio::sync::Barrier;

use crate::{BatchFetch, Cache, Error, Store};

/// The provider of the checks: answers [`value_of`] for every key (with the
/// generation after [`next_generation`](Recorder::next_generation)), except
/// the keys it was told it does not have, and records every call.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<RecorderInner>,
}

#[derive(Debug)]
struct RecorderInner {
    namespace: String,
    not_found: HashSet<String>,
    delay: Duration,
    generation: AtomicU64,
    fail_next: AtomicUsize,
    calls: Mutex<Vec<Vec<String>>>,
}

/// The error a [`Recorder`] told to fail returns.
#[derive(Debug)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the recorder was told to fail")
    }
}

impl std::error::Error for Refused {}

/// What a [`Recorder`] answers for `key` in generation 0.
pub fn value_of(key: &str) -> String {
    format!("v:{key}")
}

impl Recorder {
    /// A recorder for `namespace` that has every key and answers at once.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self::with(namespace, [], Duration::ZERO)
    }

    /// A recorder without `not_found`, whose calls take `delay`.
    pub fn with(
        namespace: impl Into<String>,
        not_found: impl IntoIterator<Item = String>,
        delay: Duration,
    ) -> Self {
        Recorder {
            inner: Arc::new(RecorderInner {
                namespace: namespace.into(),
                not_found: not_found.into_iter().collect(),
                delay,
                generation: AtomicU64::new(0),
                fail_next: AtomicUsize::new(0),
                calls: Mutex::new(Vec::new()),
            }),
        }
    }

    /// What it answers for `key` now.
    pub fn current(&self, key: &str) -> String {
        match self.inner.generation.load(Ordering::SeqCst) {
            0 => value_of(key),
            generation => format!("v:{key}@{generation}"),
        }
    }

    /// Changes every answer from now on (the source changed).
    pub fn next_generation(&self) {
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Fails the next `n` calls.
    pub fn fail_next(&self, n: usize) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// Every call's keys, in order.
    pub fn calls(&self) -> Vec<Vec<String>> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many calls were made.
    pub fn call_count(&self) -> usize {
        self.calls().len()
    }

    /// How many times each key was fetched.
    pub fn fetches_per_key(&self) -> HashMap<String, usize> {
        let mut per_key = HashMap::new();
        for key in self.calls().into_iter().flatten() {
            *per_key.entry(key).or_default() += 1;
        }
        per_key
    }
}

#[async_trait::async_trait]
impl BatchFetch for Recorder {
    type Key = String;
    type Value = String;
    type Error = Refused;

    fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    async fn fetch(&self, keys: &[String]) -> Result<HashMap<String, String>, Refused> {
        self.inner
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(keys.to_vec());
        if !self.inner.delay.is_zero() {
            tokio::time::sleep(self.inner.delay).await;
        }
        let fail = self
            .inner
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if fail {
            return Err(Refused);
        }
        Ok(keys
            .iter()
            .filter(|key| !self.inner.not_found.contains(*key))
            .map(|key| (key.clone(), self.current(key)))
            .collect())
    }
}

fn cache<S: Store<Recorder> + Clone>(
    store: &S,
    provider: &Recorder,
    ttl: Duration,
) -> Cache<Recorder> {
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

/// Runs every check but [`entries_expire`], each in a namespace of its own
/// under `namespace`.
pub async fn check_store<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    fill_then_hit(store.clone(), &format!("{namespace}/fill")).await;
    negative_entries(store.clone(), &format!("{namespace}/negative")).await;
    exactly_once_between_instances(store.clone(), &format!("{namespace}/once")).await;
    failure_caches_nothing(store.clone(), &format!("{namespace}/failure")).await;
    namespaces_are_isolated(store.clone(), &format!("{namespace}/isolated")).await;
    odd_keys_round_trip(store.clone(), &format!("{namespace}/odd")).await;
    invalidation_binds_later_loads(store, &format!("{namespace}/invalidation")).await;
}

/// A value filled by one instance is a store hit for another.
pub async fn fill_then_hit<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let provider = Recorder::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));

    let got = a.loader().load_many(keys(0..2)).await.unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got["k1"], value_of("k1"));
    assert_eq!(provider.calls(), vec![keys(0..2)]);

    let got = b.loader().load_many(keys(0..2)).await.unwrap();
    assert_eq!(got["k0"], value_of("k0"));
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
pub async fn negative_entries<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let provider = Recorder::with(namespace, ["gone".to_string()], Duration::ZERO);
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));

    assert_eq!(a.loader().load("gone".into()).await.unwrap(), None);
    let many = a
        .loader()
        .load_many(["gone".to_string(), "here".to_string()])
        .await
        .unwrap();
    assert_eq!(many.len(), 1);
    assert_eq!(many["here"], value_of("here"));

    assert_eq!(b.loader().load("gone".into()).await.unwrap(), None);
    assert_eq!(provider.fetches_per_key()["gone"], 1);
    assert_eq!(b.stats().negative_hits, 1);
    assert_eq!(b.stats().store_hits, 1);
}

/// Instances sharing the store, loading the same keys at the same moment,
/// fetch each key exactly once between them.
pub async fn exactly_once_between_instances<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    const INSTANCES: usize = 4;
    const LOADERS: usize = 16;
    let provider = Recorder::with(namespace, [], Duration::from_millis(20));
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
        assert_eq!(got["k7"], value_of("k7"));
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
pub async fn failure_caches_nothing<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let provider = Recorder::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    provider.fail_next(1);
    let err = a.loader().load_many(keys(0..3)).await.unwrap_err();
    assert!(matches!(err, Error::Provider { .. }), "{err:?}");

    let got = a.loader().load_many(keys(0..3)).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(provider.calls(), vec![keys(0..3), keys(0..3)]);
}

/// Entries of one namespace are invisible to another.
pub async fn namespaces_are_isolated<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let first = Recorder::new(format!("{namespace}/a"));
    let second = Recorder::new(format!("{namespace}/b"));
    let a = cache(&store, &first, Duration::from_secs(60));
    let b = cache(&store, &second, Duration::from_secs(60));
    a.loader().load("shared".into()).await.unwrap();
    b.loader().load("shared".into()).await.unwrap();
    assert_eq!(first.call_count(), 1);
    assert_eq!(second.call_count(), 1);
}

/// Keys with quotes, backslashes, separators, unicode, and 1 KB of length are
/// stored and found again under their exact form.
pub async fn odd_keys_round_trip<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let odd = vec![
        "it's".to_string(),
        "say \"hi\"".to_string(),
        r"back\slash\\".to_string(),
        "ünïcødé ✓ 鍵".to_string(),
        "with:colon/and,comma".to_string(),
        "x".repeat(1024),
        String::new(),
    ];
    let provider = Recorder::new(namespace);
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
    let fetched: usize = provider.calls().iter().map(Vec::len).sum();
    assert_eq!(fetched, odd.len());
    assert_eq!(b.stats().store_hits, odd.len() as u64);
}

/// After one instance's `invalidate` returns, a load that starts on any
/// instance returns the source's new value, never the old one.
pub async fn invalidation_binds_later_loads<S: Store<Recorder> + Clone>(store: S, namespace: &str) {
    let provider = Recorder::new(namespace);
    let a = cache(&store, &provider, Duration::from_secs(60));
    let b = cache(&store, &provider, Duration::from_secs(60));
    let wanted = keys(0..3);
    a.loader().load_many(wanted.clone()).await.unwrap();
    b.loader().load_many(wanted.clone()).await.unwrap();
    provider.next_generation();
    b.invalidate(wanted.clone()).await.unwrap();
    for cache in [&a, &b] {
        let got = cache.loader().load_many(wanted.clone()).await.unwrap();
        for key in &wanted {
            assert_eq!(
                got[key],
                provider.current(key),
                "an invalidated entry served"
            );
        }
    }
    assert_eq!(provider.call_count(), 2, "fetched once again, for both");
}

/// An entry is fresh for its TTL and fetched again after it; `pass` lets the
/// store's clock move past a duration (paused tokio time, or real time).
pub async fn entries_expire<S, W, Fut>(store: S, namespace: &str, ttl: Duration, pass: W)
where
    S: Store<Recorder> + Clone,
    W: Fn(Duration) -> Fut,
    Fut: Future<Output = ()>,
{
    let provider = Recorder::with(namespace, ["gone".to_string()], Duration::ZERO);
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
