//! Batching and the per-request memo: what reaches the provider, in which
//! calls, in which order.

mod support;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use loadlock::Cache;
use support::{value_of, Fake};

fn cache<K>(provider: &Fake<K>) -> Cache<Fake<K>>
where
    K: Eq + std::hash::Hash + Clone + std::fmt::Display + Send + Sync + 'static,
{
    Cache::builder(provider.clone()).build().unwrap()
}

fn s(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_loads_in_one_window_make_one_call() {
    let provider = Fake::<u64>::new("batch/two");
    let loader = cache(&provider).loader();
    let (a, b) = tokio::join!(loader.load(1), loader.load(2));
    assert_eq!(a.unwrap(), Some(value_of(&1)));
    assert_eq!(b.unwrap(), Some(value_of(&2)));
    assert_eq!(provider.calls(), vec![vec![1, 2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_many_of_nothing_makes_no_call() {
    let provider = Fake::<u64>::new("batch/empty");
    let cache = cache(&provider);
    let got = cache.loader().load_many(Vec::new()).await.unwrap();
    assert!(got.is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(provider.call_count(), 0);
    assert_eq!(cache.stats().batches, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_batch_size_splits_calls() {
    let provider = Fake::<u64>::builder("batch/max").max_batch(2).build();
    let got = cache(&provider)
        .loader()
        .load_many([1, 2, 3])
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(provider.calls(), vec![vec![1, 2], vec![3]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_do_not_count_against_the_cap() {
    let provider = Fake::<String>::builder("batch/dup").max_batch(3).build();
    let cache = cache(&provider);
    let got = cache
        .loader()
        .load_many(s(&["a", "b", "a", "a", "b", "c"]))
        .await
        .unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(provider.calls(), vec![s(&["a", "b", "c"])]);
    let stats = cache.stats();
    assert_eq!(
        (stats.loads, stats.memo_hits, stats.provider_keys),
        (6, 3, 3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_twice_concurrently_is_one_call() {
    let provider = Fake::<u64>::builder("batch/same")
        .delay(Duration::from_millis(10))
        .build();
    let loader = cache(&provider).loader();
    let (a, b) = tokio::join!(loader.load(5), loader.load(5));
    assert_eq!(a.unwrap(), Some(value_of(&5)));
    assert_eq!(b.unwrap(), Some(value_of(&5)));
    assert_eq!(provider.calls(), vec![vec![5]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_all_of_100_loads_over_10_keys_is_one_call() {
    let provider = Fake::<u64>::new("batch/join_all");
    let loader = cache(&provider).loader();
    let results = join_all((0..100u64).map(|i| loader.load(i % 10))).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.unwrap(), Some(value_of(&(i % 10))));
    }
    assert_eq!(provider.calls(), vec![(0..10).collect::<Vec<u64>>()]);
}

/// Several tasks a request spawns at the same moment share one batch on the
/// multi-thread runtime: keys from several tasks wait out the window. (A
/// window of 100 ms, so that a busy machine starting one of the tasks late
/// does not split the batch; the default is 500 µs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loads_from_spawned_tasks_share_a_batch() {
    let provider = Fake::<u64>::new("batch/spawned");
    let loader = Cache::builder(provider.clone())
        .batch_window(Duration::from_millis(100))
        .build()
        .unwrap()
        .loader();
    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let (loader, barrier) = (loader.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                loader.load_many(t * 10..t * 10 + 10).await
            })
        })
        .collect();
    for task in join_all(tasks).await {
        assert_eq!(task.unwrap().unwrap().len(), 10);
    }
    let calls = provider.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].len(), 80);
}

/// Keys reach the provider in first-asked order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_arrive_in_first_asked_order() {
    let provider = Fake::<u64>::new("batch/order");
    let loader = cache(&provider).loader();
    let order = [9u64, 3, 7, 3, 1, 9, 5];
    join_all(order.iter().map(|&k| loader.load(k))).await;
    assert_eq!(provider.calls(), vec![vec![9, 3, 7, 1, 5]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memo_answers_later_rounds() {
    let provider = Fake::<String>::new("batch/rounds");
    let loader = cache(&provider).loader();
    loader.load_many(s(&["A", "B"])).await.unwrap();
    loader.load_many(s(&["A", "C"])).await.unwrap();
    let all = loader.load_many(s(&["A", "B", "C"])).await.unwrap();
    assert_eq!(all.len(), 3);
    assert_eq!(provider.calls(), vec![s(&["A", "B"]), s(&["C"])]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prime_skips_the_provider_and_never_overwrites() {
    let provider = Fake::<u64>::new("batch/prime");
    let loader = cache(&provider).loader();

    loader.prime(1, "primed".into());
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("primed"));
    assert_eq!(provider.call_count(), 0);

    // No overwrite, of a primed key or of a loaded one.
    loader.prime(1, "again".into());
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("primed"));
    loader.load(2).await.unwrap();
    loader.prime(2, "late".into());
    assert_eq!(loader.load(2).await.unwrap(), Some(value_of(&2)));

    // clear then prime does overwrite.
    loader.clear(&1);
    loader.prime(1, "replaced".into());
    assert_eq!(loader.load(1).await.unwrap().as_deref(), Some("replaced"));
    assert_eq!(provider.calls(), vec![vec![2]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_makes_the_next_load_ask_again() {
    let provider = Fake::<u64>::new("batch/clear");
    let cache = cache(&provider);
    let loader = cache.loader();
    loader.load_many([1, 2]).await.unwrap();
    loader.clear(&1);
    loader.load_many([1, 2]).await.unwrap();
    loader.clear_all();
    loader.load_many([1, 2]).await.unwrap();
    // Cleared keys go back to the cache; its store still has them.
    assert_eq!(provider.call_count(), 1);
    let stats = cache.stats();
    assert_eq!(stats.loads, 6);
    assert_eq!(stats.memo_hits, 1);
    assert_eq!(stats.store_hits, 3);
}

/// A loader's memo keeps its answer even when the store is refilled with a
/// newer value: one request sees one value per key.
#[tokio::test(start_paused = true)]
async fn memo_is_consistent_for_the_loaders_life() {
    let provider = Fake::<u64>::new("batch/consistent");
    let cache = Cache::builder(provider.clone())
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let request = cache.loader();
    request.load(1).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    cache.loader().load(1).await.unwrap(); // another request refills
    request.load(1).await.unwrap();
    assert_eq!(provider.call_count(), 2);
    assert_eq!(cache.stats().memo_hits, 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_window_batches_loads_that_arrive_after_an_await() {
    let provider = Fake::<u64>::new("batch/window");
    let cache = Cache::builder(provider.clone())
        .batch_window(Duration::from_millis(50))
        .wait_full_window(true)
        .build()
        .unwrap();
    let loader = cache.loader();
    let late = {
        let loader = loader.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            loader.load(2).await
        }
    };
    let (a, b) = tokio::join!(loader.load(1), late);
    a.unwrap();
    b.unwrap();
    assert_eq!(provider.calls(), vec![vec![1, 2]], "30 ms < 50 ms window");
}

/// By default a window of one task's loads (through one loader handle)
/// ends when the keys stop coming: a load that waits 30 ms first is not
/// waited for, however long the window.
#[tokio::test(start_paused = true)]
async fn a_window_does_not_wait_for_loads_after_an_await() {
    let provider = Fake::<u64>::new("batch/early");
    let cache = Cache::builder(provider.clone())
        .batch_window(Duration::from_millis(50))
        .build()
        .unwrap();
    let loader = cache.loader();
    let late = async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        loader.load(2).await
    };
    let (a, b) = tokio::join!(loader.load(1), late);
    a.unwrap();
    b.unwrap();
    assert_eq!(provider.calls(), vec![vec![1], vec![2]]);
}

/// With a window far longer than the test's limit, the loads one request
/// task issues together (a `join_all`, a `load_many`, resolvers that yield
/// or await ready futures before they load) are dispatched as one batch as
/// soon as they are all in: the window is only an upper bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_issued_together_dispatch_in_one_batch_before_the_window_ends() {
    let provider = Fake::<u64>::new("batch/together");
    let cache = Cache::builder(provider.clone())
        .batch_window(Duration::from_secs(3600))
        .build()
        .unwrap();
    let loader = cache.loader();
    // A request handler, as a web server runs it: on a task of its own.
    let request = async move {
        // A join_all of loads.
        let direct = join_all((0..10u64).map(|k| loader.load(k)));
        // Several load_many.
        let spawned = join_all((0..8u64).map(|t| loader.load_many(100 + t * 10..110 + t * 10)));
        // Nested resolvers: each awaits something ready first (a yield, a
        // ready future, a value a sibling sends) and then loads.
        let (tx, rx) = tokio::sync::oneshot::channel::<u64>();
        let nested = async {
            let after_yield = async {
                tokio::task::yield_now().await;
                loader.load(200).await
            };
            // Several yields before it loads: each a pass of the scheduler,
            // which the window's quiet period outlasts. (Counting passes
            // instead would split this off on a multi-thread runtime, where
            // the window may run its passes on another worker meanwhile.)
            // How long the passes took is kept: the window promises to wait
            // for a key only while none came for 200 µs.
            let after_yields = async {
                let began = std::time::Instant::now();
                for _ in 0..5 {
                    tokio::task::yield_now().await;
                }
                let passes = began.elapsed();
                (loader.load(205).await, passes)
            };
            let after_ready = async {
                futures::future::ready(()).await;
                loader.load_many([201, 202]).await.map(|m| m.len())
            };
            let after_sibling = async {
                let key = rx.await.expect("sibling");
                loader.load(key).await
            };
            let sibling = async {
                let _ = tx.send(203);
                loader.load(204).await
            };
            tokio::join!(
                after_yield,
                after_ready,
                after_sibling,
                sibling,
                after_yields
            )
        };
        tokio::join!(direct, spawned, nested)
    };
    let (direct, spawned, nested) =
        tokio::time::timeout(Duration::from_secs(60), tokio::spawn(request))
            .await
            .expect("dispatched before the window ended")
            .expect("request task");
    assert!(direct.into_iter().all(|r| r.unwrap().is_some()));
    for many in spawned {
        assert_eq!(many.unwrap().len(), 10);
    }
    assert!(nested.0.unwrap().is_some());
    assert_eq!(nested.1.unwrap(), 2);
    assert!(nested.2.unwrap().is_some());
    assert!(nested.3.unwrap().is_some());
    let (last, passes) = nested.4;
    assert!(last.unwrap().is_some());
    let calls = provider.calls();
    // Every other key was in before the first pass of the window; the
    // window ends at the earliest 200 µs after the last of them came. Key
    // 205 came after five passes: within that time (less a margin for the
    // instant between the clock and the load), it is in the batch. On a
    // machine so busy that five passes took longer, the window may have
    // ended before it came, and only it may go in a batch of its own.
    if passes < Duration::from_micros(180) {
        assert_eq!(calls.len(), 1, "{calls:?} (passes took {passes:?})");
        assert_eq!(calls[0].len(), 10 + 80 + 6);
    } else {
        let (with_first, rest): (Vec<_>, Vec<_>) = calls.iter().partition(|c| c.contains(&0));
        assert_eq!(with_first.len(), 1, "{calls:?}");
        match rest.as_slice() {
            [] => assert_eq!(with_first[0].len(), 10 + 80 + 6, "{calls:?}"),
            [alone] => {
                assert_eq!(alone.as_slice(), [205], "{calls:?}");
                assert_eq!(with_first[0].len(), 10 + 80 + 5, "{calls:?}");
            }
            _ => panic!("more than two batches: {calls:?} (passes took {passes:?})"),
        }
    }
}

/// A window that holds a full provider call dispatches it at once, even
/// when it waits for full windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_holding_a_full_call_dispatches_at_once() {
    let provider = Fake::<u64>::builder("batch/full").max_batch(10).build();
    let cache = Cache::builder(provider.clone())
        .batch_window(Duration::from_secs(3600))
        .wait_full_window(true)
        .build()
        .unwrap();
    let loader = cache.loader();
    let limit = Duration::from_secs(60);
    // Filled in one call.
    let all_at_once = tokio::time::timeout(limit, loader.load_many(0..10)).await;
    assert_eq!(
        all_at_once.expect("dispatched once full").unwrap().len(),
        10
    );
    // Filled one key at a time.
    let one_by_one = join_all((10..20u64).map(|k| loader.load(k)));
    let one_by_one = tokio::time::timeout(limit, one_by_one).await;
    assert!(one_by_one
        .expect("dispatched once full")
        .into_iter()
        .all(|r| r.unwrap().is_some()));
    assert_eq!(
        provider.calls(),
        vec![(0..10).collect::<Vec<u64>>(), (10..20).collect()]
    );
}

#[tokio::test]
async fn invalid_settings_are_build_errors() {
    let zero_ttl = Cache::builder(Fake::<u64>::new("cfg"))
        .ttl(Duration::ZERO)
        .build();
    assert!(matches!(zero_ttl, Err(loadlock::Error::Config(_))));
    let zero_neg = Cache::builder(Fake::<u64>::new("cfg"))
        .negative_ttl(Duration::ZERO)
        .build();
    assert!(matches!(zero_neg, Err(loadlock::Error::Config(_))));
    let zero_batch = Cache::builder(Fake::<u64>::builder("cfg").max_batch(0).build()).build();
    let err = zero_batch.unwrap_err();
    assert!(err.to_string().contains("max_batch_size"), "{err}");
}
