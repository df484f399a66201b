//! The in-flight table: loads of one key across loaders of a process are
//! joined, and cancelled callers leave nothing behind.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use loadlock::Cache;
use rand::{Rng, SeedableRng};
use support::{value_of, Fake};
use tokio::sync::Barrier;

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn loaders_of_one_cache_fetch_each_key_once() {
    const LOADERS: usize = 64;
    let provider = Fake::<u64>::builder("coalesce/64")
        .delay(Duration::from_millis(20))
        .build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let barrier = Arc::new(Barrier::new(LOADERS));
    let tasks: Vec<_> = (0..LOADERS)
        .map(|i| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            tokio::spawn(async move {
                let loader = cache.loader();
                let mut keys: Vec<u64> = (0..50).collect();
                keys.rotate_left(i % 50);
                barrier.wait().await;
                // Half the loaders ask key by key, half all at once.
                if i % 2 == 0 {
                    join_all(keys.iter().map(|&k| loader.load(k)))
                        .await
                        .into_iter()
                        .map(|r| r.map(|v| v.expect("found")))
                        .collect::<Result<Vec<_>, _>>()
                        .map(|v| v.len())
                } else {
                    loader.load_many(keys).await.map(|m| m.len())
                }
            })
        })
        .collect();
    for task in join_all(tasks).await {
        assert_eq!(task.unwrap().unwrap(), 50);
    }
    let per_key = provider.fetches_per_key();
    assert_eq!(per_key.len(), 50);
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");

    let stats = cache.stats();
    assert_eq!(stats.loads, (LOADERS * 50) as u64);
    assert_eq!(stats.provider_keys, 50);
    // Every load not fetched was answered by a tier.
    assert_eq!(
        stats.memo_hits + stats.coalesced + stats.store_hits + stats.provider_keys,
        stats.loads
    );
    assert_eq!(stats.in_flight, 0);
}

/// Half of 1,000 concurrent loads are dropped at random points (before their
/// batch dispatches, while it is in flight, or just before it settles); the
/// rest complete with the right values and the in-flight table empties.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelled_loads_leave_nothing_behind() {
    let provider = Fake::<u64>::builder("coalesce/cancel")
        .delay(Duration::from_millis(30))
        .build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for i in 0..1000u64 {
        // 20 loaders (requests) of 50 loads each, over 300 keys.
        let loader = cache.loader();
        let key = rng.gen_range(0..300u64);
        let cancel_after = Duration::from_micros(rng.gen_range(0..40_000));
        let load = async move { loader.load(key).await };
        if i % 2 == 0 {
            kept.push(tokio::spawn(async move { (key, load.await) }));
        } else {
            dropped.push(tokio::spawn(async move {
                // Dropped on timeout: the future is cancelled mid-load.
                let _ = tokio::time::timeout(cancel_after, load).await;
            }));
        }
    }
    for task in join_all(dropped).await {
        task.unwrap();
    }
    for task in join_all(kept).await {
        let (key, result) = task.unwrap();
        assert_eq!(result.unwrap(), Some(value_of(&key)));
    }
    // Batches whose callers all left before dispatch are dropped; the rest
    // settle. Either way nothing stays in flight.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(cache.stats().in_flight, 0);
    let per_key = provider.fetches_per_key();
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
}

/// Same, with one loader per request asking for many keys and dropped
/// futures inside one shared batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropping_some_callers_of_a_batch_does_not_stall_the_others() {
    let provider = Fake::<u64>::builder("coalesce/partial")
        .delay(Duration::from_millis(20))
        .build();
    let cache = Cache::builder(provider.clone()).build().unwrap();
    let loader = cache.loader();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for key in 0..200u64 {
        let loader = loader.clone();
        if key % 2 == 0 {
            kept.push(tokio::spawn(async move { (key, loader.load(key).await) }));
        } else {
            let after = Duration::from_micros(rng.gen_range(0..30_000));
            dropped.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(after, loader.load(key)).await;
            }));
        }
    }
    for task in join_all(kept).await {
        let (key, result) = task.unwrap();
        assert_eq!(result.unwrap(), Some(value_of(&key)));
    }
    join_all(dropped).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(cache.stats().in_flight, 0);
    // Only keys somebody still waited for at dispatch were fetched.
    let fetched = provider.keys_fetched();
    assert!((100..=200).contains(&fetched), "{fetched}");
}

/// A key whose every caller left before its batch was dispatched is never
/// sent to the provider.
#[tokio::test(start_paused = true)]
async fn keys_nobody_waits_for_are_not_dispatched() {
    let provider = Fake::<u64>::new("coalesce/abandoned");
    // The window stays open for its whole length, so callers can leave it.
    let cache = Cache::builder(provider.clone())
        .batch_window(Duration::from_millis(50))
        .wait_full_window(true)
        .build()
        .unwrap();
    let loader = cache.loader();
    let abandoned = tokio::time::timeout(Duration::from_millis(10), loader.load_many([2, 3]));
    let (kept, gone) = tokio::join!(loader.load(1), abandoned);
    assert!(gone.is_err(), "timed out before the window closed");
    assert_eq!(kept.unwrap(), Some(value_of(&1)));
    assert_eq!(provider.calls(), vec![vec![1]]);
    // The abandoned keys were forgotten: asking again loads them.
    assert_eq!(loader.load(2).await.unwrap(), Some(value_of(&2)));
    assert_eq!(provider.calls(), vec![vec![1], vec![2]]);
}

/// A runtime that shuts down under a batch, before or after it dispatched,
/// fails the batch's callers with `Error::Closed` instead of hanging them,
/// and leaves nothing in flight.
#[test]
fn runtime_shutdown_fails_waiters_instead_of_hanging() {
    for settle in [Duration::ZERO, Duration::from_millis(20)] {
        let provider = Fake::<u64>::builder("coalesce/shutdown")
            .delay(Duration::from_secs(3600))
            .build();
        // The window stays open for its whole length: with `settle` zero
        // the runtime ends before it dispatched.
        let cache = Cache::builder(provider.clone())
            .batch_window(Duration::from_millis(5))
            .wait_full_window(true)
            .build()
            .unwrap();
        let doomed = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let loader = cache.loader();
        let mut load = Box::pin(async move { loader.load(1).await });
        doomed.block_on(async {
            assert!(futures::poll!(load.as_mut()).is_pending());
            tokio::time::sleep(settle).await;
        });
        let dispatched = provider.call_count();
        drop(doomed);

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let result =
            rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), load).await });
        match result {
            Ok(Err(loadlock::Error::Closed)) => {}
            other => panic!("expected Err(Closed), got {other:?} (dispatched: {dispatched})"),
        }
        assert_eq!(dispatched, usize::from(!settle.is_zero()));
        assert_eq!(cache.stats().in_flight, 0);
    }
}

/// A fill leaves the in-flight table when it is about to commit: a load that
/// arrives after that point reads the store (and fills it itself if the
/// writes are not visible yet) instead of joining a fill whose result an
/// invalidation could already have overtaken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loads_do_not_join_a_fill_that_is_committing() {
    use loadlock::store::{Fill, Filled, Lookup, Store};
    use loadlock::Entry;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// Makes nothing visible until the fill returns, and holds the first
    /// fill between `about_to_commit` and its return ("committing").
    #[derive(Clone)]
    struct SlowCommit {
        fills: Arc<AtomicUsize>,
        committing: Arc<Semaphore>,
        commit: Arc<Semaphore>,
    }

    #[async_trait::async_trait]
    impl Store<Fake<u64>> for SlowCommit {
        async fn get(
            &self,
            _: &str,
            keys: &[u64],
            _: Duration,
        ) -> Result<Vec<Lookup<String>>, loadlock::Error> {
            Ok(vec![Lookup::Miss; keys.len()])
        }

        async fn fill(
            &self,
            fill: Fill<'_, Fake<u64>>,
        ) -> Result<Vec<Filled<String>>, loadlock::Error> {
            let first = self.fills.fetch_add(1, Ordering::SeqCst) == 0;
            let mut found: HashMap<u64, String> = fill.fetch(fill.keys()).await?;
            let all: Vec<usize> = (0..fill.keys().len()).collect();
            fill.about_to_commit(&all);
            if first {
                self.committing.add_permits(1);
                self.commit.acquire().await.unwrap().forget();
            }
            let now = std::time::SystemTime::now();
            Ok(fill
                .keys()
                .iter()
                .map(|k| Filled::Fetched(found.remove(k).map(|v| Entry::new(v, 1, now, now))))
                .collect())
        }

        async fn invalidate(&self, _: &str, _: &[u64]) -> Result<(), loadlock::Error> {
            Ok(())
        }

        async fn invalidate_namespace(&self, _: &str) -> Result<(), loadlock::Error> {
            Ok(())
        }

        async fn write_locked(
            &self,
            _: &str,
            _: &[u64],
            work: futures::future::BoxFuture<'_, ()>,
        ) -> Result<(), loadlock::Error> {
            work.await;
            Ok(())
        }

        async fn put_if_version(
            &self,
            _: &str,
            _: &u64,
            _: u64,
            _: String,
            _: Duration,
        ) -> Result<u64, loadlock::Error> {
            Ok(0)
        }
    }

    let store = SlowCommit {
        fills: Arc::default(),
        committing: Arc::new(Semaphore::new(0)),
        commit: Arc::new(Semaphore::new(0)),
    };
    let provider = Fake::<u64>::new("coalesce/committing");
    let cache = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let first = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(1).await }
    });
    store.committing.acquire().await.unwrap().forget();

    // The first fill is committing: a new load does not wait for it.
    let second = tokio::time::timeout(Duration::from_secs(5), cache.loader().load(1)).await;
    assert_eq!(
        second.expect("not joined to the committing fill").unwrap(),
        Some(value_of(&1))
    );
    assert!(!first.is_finished());
    assert_eq!(cache.stats().coalesced, 0);
    assert_eq!(provider.call_count(), 2);

    store.commit.add_permits(1);
    assert_eq!(first.await.unwrap().unwrap(), Some(value_of(&1)));
    assert_eq!(cache.stats().in_flight, 0);
}

/// A value that counts its clones.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Counted(u64);

static CLONES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Clone for Counted {
    fn clone(&self) -> Self {
        CLONES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Counted(self.0)
    }
}

/// A provider of `Counted` values that answers once the test lets it.
struct Gated(Arc<tokio::sync::Semaphore>);

#[async_trait::async_trait]
impl loadlock::BatchFetch for Gated {
    type Key = u64;
    type Value = Counted;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "coalesce/clones"
    }

    async fn fetch(
        &self,
        keys: &[u64],
    ) -> Result<std::collections::HashMap<u64, Counted>, Self::Error> {
        let _ = self.0.acquire().await;
        Ok(keys.iter().map(|&k| (k, Counted(k))).collect())
    }
}

/// A value is cloned where the API hands it out, not on its way there: a
/// load that joins another loader's fill costs one clone (its own), on top
/// of the store's copy and the first loader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joined_load_clones_the_value_once() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let cache = Cache::builder(Gated(gate.clone())).build().unwrap();
    let (first, second) = (cache.loader(), cache.loader());
    let leader = tokio::spawn(async move { first.load(7).await });
    // The second load joins the first one's fill while it waits.
    while cache.stats().in_flight == 0 {
        tokio::task::yield_now().await;
    }
    let joined = tokio::spawn(async move { second.load(7).await });
    while cache.stats().coalesced == 0 {
        tokio::task::yield_now().await;
    }
    let before = CLONES.load(std::sync::atomic::Ordering::SeqCst);
    gate.add_permits(1);
    assert_eq!(leader.await.unwrap().unwrap(), Some(Counted(7)));
    assert_eq!(joined.await.unwrap().unwrap(), Some(Counted(7)));
    let clones = CLONES.load(std::sync::atomic::Ordering::SeqCst) - before;
    // The store's copy, and one for each of the two callers.
    assert!(clones <= 3, "{clones} clones");
}
