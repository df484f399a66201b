//! Shared by the integration tests: a provider fake that counts everything.
#![allow(dead_code, unreachable_pub)]

pub mod pg;

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Display};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use loadlock::BatchFetch;

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
    calls: Mutex<Vec<Vec<K>>>,
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
}

impl<K: Eq + Hash + Clone> FakeBuilder<K> {
    fn new(namespace: impl Into<String>) -> Self {
        FakeBuilder {
            namespace: namespace.into(),
            max_batch: 100,
            delay: Duration::ZERO,
            gate: None,
            not_found: HashSet::new(),
        }
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
                calls: Mutex::new(Vec::new()),
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

    async fn fetch(&self, keys: &[K]) -> Result<HashMap<K, String>, FakeError> {
        self.inner.calls.lock().unwrap().push(keys.to_vec());
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
