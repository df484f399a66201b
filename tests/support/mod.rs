//! Shared by the integration tests: a provider fake that counts everything.
#![allow(dead_code, unreachable_pub)]

#[cfg(feature = "postgres")]
pub mod pg;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Display};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, ErrorClass};

/// The error the fake returns when told to fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeError(pub String);

impl Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fake provider error: {}", self.0)
    }
}

impl std::error::Error for FakeError {}

/// A provider that answers `"v:{key}"` for every key except the ones marked
/// not found, records every call, and can be told to fail, panic, or be slow.
/// Clones share the same records, so a test keeps one to inspect.
#[derive(Clone)]
pub struct Fake<K> {
    inner: Arc<Inner<K>>,
}

struct Inner<K> {
    namespace: String,
    max_batch: usize,
    delay: Duration,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    not_found: HashSet<K>,
    failures: ErrorClass,
    parse: Option<fn(&str) -> Option<K>>,
    calls: Mutex<Vec<Vec<K>>>,
    started: Mutex<Vec<Instant>>,
    fail_next: AtomicUsize,
    panic_next: AtomicUsize,
}

impl<K: Eq + Hash + Clone> Fake<K> {
    pub fn new(namespace: impl Into<String>) -> Self {
        FakeBuilder::new(namespace).build()
    }

    pub fn builder(namespace: impl Into<String>) -> FakeBuilder<K> {
        FakeBuilder::new(namespace)
    }

    /// Every call so far, with its keys in the order received.
    pub fn calls(&self) -> Vec<Vec<K>> {
        self.inner.calls.lock().unwrap().clone()
    }

    /// When each call so far began, in the order of [`calls`](Self::calls).
    pub fn call_times(&self) -> Vec<Instant> {
        self.inner.started.lock().unwrap().clone()
    }

    pub fn call_count(&self) -> usize {
        self.inner.calls.lock().unwrap().len()
    }

    /// Keys fetched over all calls, duplicates across calls included.
    pub fn keys_fetched(&self) -> usize {
        self.inner.calls.lock().unwrap().iter().map(Vec::len).sum()
    }

    /// How many times each key was fetched.
    pub fn fetches_per_key(&self) -> HashMap<K, usize> {
        let mut counts = HashMap::new();
        for call in self.inner.calls.lock().unwrap().iter() {
            for key in call {
                *counts.entry(key.clone()).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The next `n` calls fail with [`FakeError`].
    pub fn fail_next(&self, n: usize) {
        self.inner.fail_next.store(n, Ordering::SeqCst);
    }

    /// The next `n` calls panic.
    pub fn panic_next(&self, n: usize) {
        self.inner.panic_next.store(n, Ordering::SeqCst);
    }
}

pub fn value_of(key: &impl Display) -> String {
    format!("v:{key}")
}

pub struct FakeBuilder<K> {
    namespace: String,
    max_batch: usize,
    delay: Duration,
    gate: Option<Arc<tokio::sync::Semaphore>>,
    not_found: HashSet<K>,
    failures: ErrorClass,
    parse: Option<fn(&str) -> Option<K>>,
}

impl<K: Eq + Hash + Clone> FakeBuilder<K> {
    fn new(namespace: impl Into<String>) -> Self {
        FakeBuilder {
            namespace: namespace.into(),
            max_batch: 100,
            delay: Duration::ZERO,
            gate: None,
            not_found: HashSet::new(),
            failures: ErrorClass::Permanent,
            parse: None,
        }
    }

    /// Tells keys from their texts with `parse` (`BatchFetch::parse_key`),
    /// so that its calls can carry keys other instances joined to them.
    pub fn parse_keys(mut self, parse: fn(&str) -> Option<K>) -> Self {
        self.parse = Some(parse);
        self
    }

    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n;
        self
    }

    /// Each call sleeps this long (tokio time) before answering.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Each call takes (and keeps) one permit of `gate` before answering, so
    /// a test can hold calls mid-fetch.
    pub fn gate(mut self, gate: Arc<tokio::sync::Semaphore>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// How the cache is told to treat the calls told to fail (default:
    /// permanent failures).
    pub fn failures(mut self, class: ErrorClass) -> Self {
        self.failures = class;
        self
    }

    pub fn not_found(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.not_found.extend(keys);
        self
    }

    pub fn build(self) -> Fake<K> {
        Fake {
            inner: Arc::new(Inner {
                namespace: self.namespace,
                max_batch: self.max_batch,
                delay: self.delay,
                gate: self.gate,
                not_found: self.not_found,
                failures: self.failures,
                parse: self.parse,
                calls: Mutex::new(Vec::new()),
                started: Mutex::new(Vec::new()),
                fail_next: AtomicUsize::new(0),
                panic_next: AtomicUsize::new(0),
            }),
        }
    }
}

fn take_one(counter: &AtomicUsize) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl<K> BatchFetch for Fake<K>
where
    K: Eq + Hash + Clone + Display + Send + Sync + 'static,
{
    type Key = K;
    type Value = String;
    type Error = FakeError;

    fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn max_batch_size(&self) -> usize {
        self.inner.max_batch
    }

    fn classify(&self, _: &FakeError) -> ErrorClass {
        self.inner.failures
    }

    fn parse_key(&self, text: &str) -> Option<K> {
        self.inner.parse.and_then(|parse| parse(text))
    }

    async fn fetch(&self, keys: &[K]) -> Result<HashMap<K, String>, FakeError> {
        {
            // One lock for both, so the two records keep one order.
            let mut calls = self.inner.calls.lock().unwrap();
            calls.push(keys.to_vec());
            self.inner.started.lock().unwrap().push(Instant::now());
        }
        if !self.inner.delay.is_zero() {
            tokio::time::sleep(self.inner.delay).await;
        }
        if let Some(gate) = &self.inner.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        if take_one(&self.inner.panic_next) {
            panic!("fake provider told to panic");
        }
        if take_one(&self.inner.fail_next) {
            return Err(FakeError("told to fail".into()));
        }
        Ok(keys
            .iter()
            .filter(|key| !self.inner.not_found.contains(key))
            .map(|key| (key.clone(), value_of(key)))
            .collect())
    }
}

/// A provider that fails some keys alone, the way a batch API answers one
/// bad id among good ones: `permanent` keys always, `transient` keys the
/// given number of times before answering. Records every call.
#[derive(Clone)]
pub struct PerKey {
    namespace: String,
    permanent: Arc<HashSet<u64>>,
    transient: Arc<Mutex<HashMap<u64, usize>>>,
    calls: Arc<Mutex<Vec<Vec<u64>>>>,
}

/// Why [`PerKey`] failed a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    Gone(u64),
    Blip(u64),
}

impl Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::Gone(key) => write!(f, "item {key} cannot be read"),
            KeyError::Blip(key) => write!(f, "item {key} timed out upstream"),
        }
    }
}

impl std::error::Error for KeyError {}

impl PerKey {
    pub fn new(
        namespace: &str,
        permanent: impl IntoIterator<Item = u64>,
        transient: impl IntoIterator<Item = (u64, usize)>,
    ) -> Self {
        PerKey {
            namespace: namespace.to_owned(),
            permanent: Arc::new(permanent.into_iter().collect()),
            transient: Arc::new(Mutex::new(transient.into_iter().collect())),
            calls: Arc::default(),
        }
    }

    pub fn calls(&self) -> Vec<Vec<u64>> {
        self.calls.lock().unwrap().clone()
    }
}

#[async_trait::async_trait]
impl BatchFetch for PerKey {
    type Key = u64;
    type Value = String;
    type Error = KeyError;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn fetch(&self, _: &[u64]) -> Result<HashMap<u64, String>, KeyError> {
        unreachable!("the cache calls fetch_each")
    }

    async fn fetch_each(
        &self,
        keys: &[u64],
    ) -> Result<HashMap<u64, Result<String, KeyError>>, KeyError> {
        self.calls.lock().unwrap().push(keys.to_vec());
        let mut transient = self.transient.lock().unwrap();
        Ok(keys
            .iter()
            .map(|&key| {
                let answer = if self.permanent.contains(&key) {
                    Err(KeyError::Gone(key))
                } else if let Some(left) = transient.get_mut(&key).filter(|n| **n > 0) {
                    *left -= 1;
                    Err(KeyError::Blip(key))
                } else {
                    Ok(value_of(&key))
                };
                (key, answer)
            })
            .collect())
    }

    fn classify(&self, error: &KeyError) -> loadlock::ErrorClass {
        match error {
            KeyError::Gone(_) => loadlock::ErrorClass::Permanent,
            KeyError::Blip(_) => loadlock::ErrorClass::Transient,
        }
    }
}

/// 100 keys in one batch, 3 of them failed alone by the provider: the 97
/// others are answered and cached, the 3 fail with their own error, and
/// the next loads ask the provider for the 3 alone.
pub async fn three_keys_of_a_hundred_fail(cache: &loadlock::Cache<PerKey>, provider: &PerKey) {
    const FAILING: [u64; 3] = [7, 42, 99];
    let mut first_round_calls = 0;
    for round in 0..2 {
        if round == 1 {
            first_round_calls = provider.calls().len();
        }
        let loader = cache.loader();
        let answers = futures::future::join_all((0..100u64).map(|k| loader.load(k))).await;
        for (key, answer) in (0..100u64).zip(answers) {
            if FAILING.contains(&key) {
                let err = answer.unwrap_err();
                assert!(matches!(err, loadlock::Error::Provider { .. }), "{err:?}");
                assert_eq!(err.provider_error::<KeyError>(), Some(&KeyError::Gone(key)));
            } else {
                assert_eq!(answer.unwrap(), Some(value_of(&key)), "round {round}");
            }
        }
    }
    let calls = provider.calls();
    // Each round's keys normally go in one call. The tests issue them from
    // the runtime's `block_on` (outside any task), so they wait out the
    // whole batch window while its task runs on a worker: a test thread the
    // machine pauses for longer than the window mid `join_all` splits the
    // window, and so the call (batching is tested on its own in
    // `tests/batching.rs`). What is checked here is what was asked: every
    // key once in the first round, then the failed keys alone.
    let mut first: Vec<u64> = calls[..first_round_calls].concat();
    first.sort_unstable();
    assert_eq!(first, (0..100).collect::<Vec<u64>>(), "{calls:?}");
    let mut again: Vec<u64> = calls[first_round_calls..].concat();
    again.sort_unstable();
    assert_eq!(
        again,
        FAILING.to_vec(),
        "only the failed keys are asked again, once each: {calls:?}"
    );
}

/// A fleet under load: through each of `caches`, 64 loaders of 25 keys
/// each (Zipf(1.0) over 2,000 keys), all released at once; checks every
/// value and returns the distinct keys asked.
pub async fn zipf_fleet(caches: &[loadlock::Cache<Fake<u64>>], seed: u64) -> HashSet<u64> {
    use rand::{Rng, SeedableRng};
    const LOADERS: usize = 64;
    let zipf = rand_distr::Zipf::new(2000, 1.0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let barrier = Arc::new(tokio::sync::Barrier::new(caches.len() * LOADERS));
    let mut asked = HashSet::new();
    let mut tasks = Vec::new();
    for cache in caches {
        for _ in 0..LOADERS {
            let keys: Vec<u64> = (0..25).map(|_| rng.sample(zipf) as u64).collect();
            asked.extend(keys.iter().copied());
            let (cache, barrier) = (cache.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                let got = cache.loader().load_many(keys.clone()).await.unwrap();
                for key in &keys {
                    assert_eq!(got[key], value_of(key));
                }
            }));
        }
    }
    for task in futures::future::join_all(tasks).await {
        task.unwrap();
    }
    asked
}

/// A lock held on a direct connection makes a load through `store` (whose
/// lock timeout is 300 ms) fail with `LockTimeout` after that timeout, not
/// hang; once released, the key loads.
#[cfg(feature = "postgres")]
pub async fn a_held_lock_times_out(db: &pg::TestDb, store: loadlock::PgStore, namespace: &str) {
    use loadlock::{Cache, Error};
    use sqlx::Connection;
    use std::time::Instant;
    let provider = Fake::<u64>::new(namespace);
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();

    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(loadlock::store::lock_id(namespace, "5"))
        .execute(&mut *tx)
        .await
        .unwrap();

    let started = Instant::now();
    let err = cache.loader().load(5).await.unwrap_err();
    let waited = started.elapsed();
    match &err {
        Error::LockTimeout {
            timeout,
            keys,
            namespace: of,
        } => {
            assert_eq!(*timeout, Duration::from_millis(300));
            assert_eq!(*keys, 1);
            assert_eq!(&**of, namespace);
        }
        other => panic!("expected LockTimeout, got {other:?}"),
    }
    assert!(!err.is_provider());
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(provider.call_count(), 0);

    tx.commit().await.unwrap();
    assert_eq!(cache.loader().load(5).await.unwrap(), Some(value_of(&5)));
    assert_eq!(provider.call_count(), 1);
}

/// A fill whose provider call fails releases its leases at once: a cache on
/// `second`, waiting for the key a cache on `first` leased, claims and
/// fetches it itself instead of waiting for the lease to expire (it lasts
/// the provider timeout, 30 s here). `first` and `second` share one table
/// (or are one store).
pub async fn a_failed_fill_releases_its_leases_at_once<S>(first: S, second: S, namespace: &str)
where
    S: loadlock::store::Store<Fake<u64>> + Clone,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let failing = Fake::<u64>::builder(namespace).gate(gate.clone()).build();
    failing.fail_next(1);
    let first = loadlock::Cache::builder(failing.clone())
        .store(first)
        .provider_timeout(Duration::from_secs(30))
        .retry(loadlock::RetryPolicy::none())
        .build()
        .unwrap();
    let healthy = Fake::<u64>::new(namespace);
    let second = loadlock::Cache::builder(healthy.clone())
        .store(second)
        .build()
        .unwrap();
    let failed = tokio::spawn(async move { first.loader().load(1).await });
    while failing.call_count() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The key is leased by the first cache's fill: the second waits.
    let waiting = tokio::spawn(async move { second.loader().load(1).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !waiting.is_finished(),
        "the key is leased by the first fill"
    );
    gate.add_permits(1);
    assert!(failed.await.unwrap().is_err());
    let loaded = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting fill did not wait for the lease to expire")
        .unwrap()
        .unwrap();
    assert_eq!(loaded, Some(value_of(&1)));
    assert_eq!(healthy.keys_fetched(), 1);
}
