//! The `metrics` feature: with a recorder installed when the cache is built,
//! its counters and histograms move with the cache's work, labelled by
//! namespace, and agree with `Stats`.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use loadlock::Cache;
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use support::Fake;

/// Samples of one histogram.
#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

/// A recorder that keeps every counter and histogram by name and labels.
#[derive(Default)]
struct Seen {
    counters: Mutex<HashMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<HashMap<String, Arc<Samples>>>,
}

/// `name{label=value,...}`, labels sorted.
fn id(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Seen {
    fn counter(&self, id: &str) -> u64 {
        self.counters
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn samples(&self, id: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .unwrap()
            .get(id)
            .map_or_else(Vec::new, |h| h.0.lock().unwrap().clone())
    }
}

impl Recorder for Seen {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.counters.lock().unwrap();
        Counter::from_arc(counters.entry(id(key)).or_default().clone())
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(id(key)).or_default().clone())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_histograms_move_with_the_cache() {
    let seen = Seen::default();
    let provider = Fake::<u64>::new("metrics/users");
    let cache =
        metrics::with_local_recorder(&seen, || Cache::builder(provider.clone()).build().unwrap());
    let ns = "namespace=metrics/users";

    // 10 misses in one call; then a store hit and a memo hit.
    cache.loader().load_many(0..10).await.unwrap();
    let loader = cache.loader();
    loader.load(1).await.unwrap();
    loader.load(1).await.unwrap();
    // A failed call: one error.
    provider.fail_next(1);
    assert!(cache.loader().load(99).await.is_err());

    let stats = cache.stats();
    assert_eq!(seen.counter(&format!("loadlock_loads_total{{{ns}}}")), 13);
    assert_eq!(stats.loads, 13);
    assert_eq!(
        seen.counter(&format!("loadlock_provider_calls_total{{{ns}}}")),
        2
    );
    assert_eq!(
        seen.counter(&format!("loadlock_provider_keys_total{{{ns}}}")),
        11
    );
    assert_eq!(
        seen.counter(&format!("loadlock_hits_total{{{ns},tier=store}}")),
        stats.store_hits
    );
    assert_eq!(
        seen.counter(&format!("loadlock_hits_total{{{ns},tier=memo}}")),
        1
    );
    assert_eq!(seen.counter(&format!("loadlock_errors_total{{{ns}}}")), 1);
    assert_eq!(
        seen.counter(&format!("loadlock_batches_total{{{ns}}}")),
        stats.batches
    );

    let calls = seen.samples(&format!("loadlock_provider_call_duration_seconds{{{ns}}}"));
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls.iter().all(|s| *s >= 0.0));
    assert_eq!(
        seen.samples(&format!("loadlock_fill_duration_seconds{{{ns}}}"))
            .len(),
        2
    );
    assert_eq!(
        seen.samples(&format!("loadlock_lock_wait_seconds{{{ns}}}"))
            .len() as u64,
        stats.lock_waits
    );
    assert!(stats.lock_waits > 0);
}

#[tokio::test]
async fn without_a_recorder_nothing_is_recorded_and_stats_still_count() {
    let cache = Cache::builder(Fake::<u64>::new("metrics/none"))
        .build()
        .unwrap();
    cache.loader().load(1).await.unwrap();
    assert_eq!(cache.stats().loads, 1);
}
