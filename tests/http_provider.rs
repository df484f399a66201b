//! The provider side against a real HTTP server (wiremock): batching,
//! 429 / Retry-After, retries, permanent errors, timeouts, local and
//! fleet-wide rate limits.

mod support;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::join_all;
use loadlock::{Cache, Error, HttpBatchProvider, HttpError, LockMode, Quota, RetryPolicy};
use serde::{Deserialize, Serialize};
use support::pg::TestDb;
use wiremock::matchers::{method, path, query_param};
use wiremock::{Match, Mock, MockServer, Request, Respond, ResponseTemplate};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Item {
    id: u64,
    name: String,
}

fn item(id: u64) -> Item {
    Item {
        id,
        name: format!("item {id}"),
    }
}

fn ids_of(request: &Request) -> Vec<u64> {
    request
        .url
        .query_pairs()
        .find(|(k, _)| k == "ids")
        .map(|(_, v)| v.split(',').map(|id| id.parse().unwrap()).collect())
        .unwrap_or_default()
}

fn joined(ids: impl IntoIterator<Item = u64>) -> String {
    ids.into_iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// Answers every asked id, recording when each request arrived.
#[derive(Clone, Default)]
struct Echo {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    delay: Duration,
}

impl Respond for Echo {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.arrivals.lock().unwrap().push(Instant::now());
        let items: Vec<Item> = ids_of(request).into_iter().map(item).collect();
        ResponseTemplate::new(200)
            .set_body_json(serde_json::json!({ "items": items }))
            .set_delay(self.delay)
    }
}

/// Matches a request that asks for any of `ids`.
struct AsksForAnyOf(HashSet<u64>);

impl Match for AsksForAnyOf {
    fn matches(&self, request: &Request) -> bool {
        ids_of(request).iter().any(|id| self.0.contains(id))
    }
}

fn provider(server: &MockServer, namespace: &str) -> HttpBatchProvider<u64, Item> {
    HttpBatchProvider::new(
        reqwest::Client::new(),
        &format!("{}/items", server.uri()),
        namespace,
    )
    .unwrap()
}

fn quick_retries() -> RetryPolicy {
    RetryPolicy::default()
        .with_backoff(Duration::from_millis(10), Duration::from_millis(50))
        .with_jitter(false)
}

/// 250 missing keys with max batch 100 are exactly 3 requests with the right
/// ids, and no request ever names a key the shared store already has.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn missing_keys_go_in_batches_and_stored_keys_never_do() {
    let server = MockServer::start().await;
    let db = TestDb::new("http_batches").await;
    let a = Cache::builder(provider(&server, "http/batches"))
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let b = Cache::builder(provider(&server, "http/batches"))
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();

    // Instance A stores keys 0..50.
    Mock::given(query_param("ids", joined(0..50)))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    a.loader().load_many(0..50).await.unwrap();
    server.verify().await;
    server.reset().await;

    // Instance B asks for 0..300: 250 missing keys, in three requests.
    Mock::given(AsksForAnyOf((0..50).collect()))
        .respond_with(Echo::default())
        .expect(0)
        .named("a request for a key already in the shared store")
        .mount(&server)
        .await;
    for range in [50..150, 150..250, 250..300] {
        Mock::given(method("GET"))
            .and(path("/items"))
            .and(query_param("ids", joined(range)))
            .respond_with(Echo::default())
            .expect(1)
            .mount(&server)
            .await;
    }
    let got = b.loader().load_many(0..300).await.unwrap();
    assert_eq!(got.len(), 300);
    assert_eq!(got[&299], item(299));
    server.verify().await;
    assert_eq!(b.stats().provider_calls, 3);
    assert_eq!(b.stats().store_hits, 50);
    db.cleanup().await;
}

async fn rate_limited_then_ok(
    retry_after: String,
) -> (Duration, Cache<HttpBatchProvider<u64, Item>>) {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", retry_after.as_str()))
        .up_to_n_times(1)
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/429"))
        .retry(quick_retries())
        .build()
        .unwrap();
    let started = Instant::now();
    let got = cache.loader().load(7).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(got, Some(item(7)));
    server.verify().await;
    (elapsed, cache)
}

#[tokio::test]
async fn retry_after_in_seconds_is_waited_out() {
    let (elapsed, cache) = rate_limited_then_ok("2".into()).await;
    assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
    let stats = cache.stats();
    assert_eq!(stats.provider_calls, 2);
    assert_eq!(stats.provider_retries, 1);
    assert_eq!(stats.rate_limited_waits, 1);
}

#[tokio::test]
async fn retry_after_as_an_http_date_is_waited_out() {
    let at = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(4));
    let (elapsed, cache) = rate_limited_then_ok(at).await;
    // HTTP dates have whole seconds: 4 s from now is more than 3 s away,
    // which leaves a second for the test's own setup.
    assert!(elapsed >= Duration::from_secs(2), "{elapsed:?}");
    assert_eq!(cache.stats().provider_calls, 2);
}

#[tokio::test]
async fn retry_after_beyond_the_maximum_fails_with_the_delay() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "120"))
        .expect(1)
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/429max"))
        .retry(quick_retries().with_max_retry_after(Duration::from_secs(10)))
        .build()
        .unwrap();
    let started = Instant::now();
    let err = cache.loader().load(1).await.unwrap_err();
    match err {
        Error::RateLimited { retry_after, .. } => {
            assert_eq!(retry_after, Duration::from_secs(120))
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    server.verify().await;
}

#[tokio::test]
async fn server_errors_are_retried() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .expect(2)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/500"))
        .retry(quick_retries())
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(3).await.unwrap(), Some(item(3)));
    server.verify().await;
    assert_eq!(cache.stats().provider_retries, 2);
}

#[tokio::test]
async fn persistent_server_errors_fail_after_the_attempts_and_cache_nothing() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(ResponseTemplate::new(503).set_body_string("down"))
        .expect(4)
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/503"))
        .retry(quick_retries().with_max_attempts(NonZeroU32::new(4).unwrap()))
        .build()
        .unwrap();
    let err = cache.loader().load(3).await.unwrap_err();
    match err.provider_error::<HttpError>() {
        Some(HttpError::Status { status, body }) => {
            assert_eq!(status.as_u16(), 503);
            assert_eq!(body, "down");
        }
        other => panic!("expected an HTTP 503, got {other:?} from {err:?}"),
    }
    server.verify().await;

    // Nothing was cached: the next load asks again.
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    assert_eq!(cache.loader().load(3).await.unwrap(), Some(item(3)));
    server.verify().await;
}

async fn permanent_failure(response: ResponseTemplate) -> Error {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/permanent"))
        .retry(quick_retries())
        .build()
        .unwrap();
    let started = Instant::now();
    let err = cache.loader().load(9).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "failed at once");
    server.verify().await;
    assert_eq!(cache.stats().provider_retries, 0);

    // Nothing cached: asking again makes a request.
    server.reset().await;
    Mock::given(method("GET"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    assert_eq!(cache.loader().load(9).await.unwrap(), Some(item(9)));
    server.verify().await;
    err
}

#[tokio::test]
async fn not_found_status_is_permanent() {
    let err = permanent_failure(ResponseTemplate::new(404)).await;
    assert!(
        matches!(err.provider_error::<HttpError>(), Some(HttpError::Status { status, .. }) if status.as_u16() == 404),
        "{err:?}"
    );
}

#[tokio::test]
async fn malformed_json_is_permanent() {
    let err =
        permanent_failure(ResponseTemplate::new(200).set_body_string("{\"items\": [oops")).await;
    assert!(
        matches!(
            err.provider_error::<HttpError>(),
            Some(HttpError::Decode(_))
        ),
        "{err:?}"
    );
}

/// A hung provider fails the load after the timeout, and its locks are
/// released: another instance loads the key at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_provider_times_out_and_releases_the_lock() {
    let db = TestDb::new("http_hang").await;
    let hung = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(Echo {
            delay: Duration::from_secs(60),
            ..Echo::default()
        })
        .mount(&hung)
        .await;
    let healthy = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&healthy)
        .await;

    let a = Cache::builder(provider(&hung, "http/hang"))
        .store(db.store(LockMode::PerKey).await)
        .provider_timeout(Duration::from_millis(300))
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let b = Cache::builder(provider(&healthy, "http/hang"))
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();

    let started = Instant::now();
    let err = a.loader().load(1).await.unwrap_err();
    assert!(
        matches!(err, Error::ProviderTimeout { timeout, .. } if timeout == Duration::from_millis(300)),
        "{err:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(a.stats().provider_timeouts, 1);

    let started = Instant::now();
    assert_eq!(b.loader().load(1).await.unwrap(), Some(item(1)));
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(2),
        "B waited {waited:?} for the lock"
    );
    healthy.verify().await;
    db.cleanup().await;
}

/// The largest number of arrivals within any window of `window`.
fn max_in_window(arrivals: &[Instant], window: Duration) -> usize {
    let mut sorted = arrivals.to_vec();
    sorted.sort();
    (0..sorted.len())
        .map(|i| {
            sorted[i..]
                .iter()
                .take_while(|t| t.duration_since(sorted[i]) < window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// 50 batches through a local quota of 10 calls/s: no 1 s window at the
/// provider sees more than 10 requests.
///
/// The limiter spaces calls when they are sent; the network (here: the
/// scheduler of a loaded 2-core machine) can bunch their arrivals by a few
/// milliseconds. As the README advises, the quota leaves a margin below the
/// provider's limit to absorb that (5% here, for a loaded CI machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_rate_limit_holds_in_every_window() {
    let server = MockServer::start().await;
    let echo = Echo::default();
    Mock::given(method("GET"))
        .respond_with(echo.clone())
        .expect(50)
        .mount(&server)
        .await;
    let quota =
        Quota::per_period(NonZeroU32::new(10).unwrap(), Duration::from_millis(1050)).unwrap();
    // One key per call, so that waiting loads cannot share calls: every
    // load is a call of its own.
    let cache = Cache::builder(provider(&server, "http/local-limit").max_batch_size(1))
        .rate_limit_calls(quota)
        .build()
        .unwrap();
    let loads = (0..50u64).map(|key| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.loader().load(key).await })
    });
    for load in join_all(loads).await {
        assert!(load.unwrap().unwrap().is_some());
    }
    server.verify().await;
    let arrivals = echo.arrivals.lock().unwrap().clone();
    let max = max_in_window(&arrivals, Duration::from_secs(1));
    let span = arrivals
        .iter()
        .max()
        .unwrap()
        .duration_since(*arrivals.iter().min().unwrap());
    eprintln!("local limit 10 per 1.05 s: 50 calls over {span:?}, at most {max} in any 1 s window");
    assert!(max <= 10, "{max} requests within one second");
    assert!(cache.stats().rate_limited_waits > 0);
}

/// 4 instances (each its own pools) calling `server`, sharing one fleet
/// budget of `quota`.
async fn fleet(
    db: &TestDb,
    server: &MockServer,
    quota: Quota,
    namespace: &str,
) -> Vec<Cache<HttpBatchProvider<u64, Item>>> {
    let mut caches = Vec::new();
    for _ in 0..4 {
        caches.push(
            Cache::builder(provider(server, namespace))
                .store(db.store(LockMode::PerKey).await)
                .fleet_rate_limit(db.budget(quota).await)
                .build()
                .unwrap(),
        );
    }
    caches
}

/// 4 instances share a fleet budget of 10 calls/s: over 5 s they make at
/// most 10 x 5 + burst calls between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_budget_is_shared_by_all_instances() {
    const RUN: Duration = Duration::from_secs(5);
    let db = TestDb::new("http_fleet").await;
    let server = MockServer::start().await;
    let echo = Echo::default();
    Mock::given(method("GET"))
        .respond_with(echo.clone())
        .mount(&server)
        .await;
    let quota = Quota::per_second(NonZeroU32::new(10).unwrap());
    let caches = fleet(&db, &server, quota, "http/fleet").await;

    let next_key = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for cache in &caches {
        for _ in 0..4 {
            let (cache, next_key) = (cache.clone(), next_key.clone());
            workers.push(tokio::spawn(async move {
                while started.elapsed() < RUN {
                    let key = next_key.fetch_add(1, Ordering::Relaxed) as u64;
                    // Stop waiting at the end of the run; the call may still
                    // be counted if it was already sent.
                    let _ = tokio::time::timeout(
                        RUN.saturating_sub(started.elapsed()),
                        cache.loader().load(key),
                    )
                    .await;
                }
            }));
        }
    }
    for worker in join_all(workers).await {
        worker.unwrap();
    }
    let arrivals: Vec<Instant> = echo
        .arrivals
        .lock()
        .unwrap()
        .iter()
        .copied()
        .filter(|t| t.duration_since(started) < RUN)
        .collect();
    let per_instance: Vec<u64> = caches.iter().map(|c| c.stats().provider_calls).collect();
    eprintln!(
        "fleet budget 10/s, 4 instances, 5 s: {} calls (budget {}), per instance {per_instance:?}, \
         at most {} in any 1 s window",
        arrivals.len(),
        10 * 5 + 1,
        max_in_window(&arrivals, Duration::from_secs(1))
    );
    assert!(arrivals.len() <= 10 * 5 + 1, "{} calls", arrivals.len());
    assert!(
        arrivals.len() >= 40,
        "the budget was used: {} calls",
        arrivals.len()
    );
    assert!(
        per_instance.iter().filter(|&&n| n > 0).count() >= 2,
        "{per_instance:?}"
    );
    // Batches whose callers stopped waiting still finish (by design); let
    // them, before the schema is dropped under them.
    while caches.iter().any(|c| c.stats().in_flight > 0) {
        assert!(started.elapsed() < RUN * 3, "batches did not drain");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db.cleanup().await;
}

/// Answers the first request with 429 and `Retry-After: 2`, the rest
/// normally, recording arrival times.
#[derive(Clone, Default)]
struct ThrottleOnce {
    echo: Echo,
    throttled_at: Arc<Mutex<Option<Instant>>>,
}

impl Respond for ThrottleOnce {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let mut throttled = self.throttled_at.lock().unwrap();
        if throttled.is_none() {
            *throttled = Some(Instant::now());
            return ResponseTemplate::new(429).insert_header("Retry-After", "2");
        }
        drop(throttled);
        self.echo.respond(request)
    }
}

/// A 429 seen by one instance pauses every instance until `blocked_until`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_429_pauses_the_whole_fleet() {
    let db = TestDb::new("http_pause").await;
    let server = MockServer::start().await;
    let responder = ThrottleOnce::default();
    Mock::given(method("GET"))
        .respond_with(responder.clone())
        .mount(&server)
        .await;
    let quota = Quota::per_second(NonZeroU32::new(50).unwrap());
    let caches = fleet(&db, &server, quota, "http/pause").await;
    let next_key = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for cache in &caches {
        for _ in 0..2 {
            let (cache, next_key) = (cache.clone(), next_key.clone());
            workers.push(tokio::spawn(async move {
                while started.elapsed() < Duration::from_secs(4) {
                    let key = next_key.fetch_add(1, Ordering::Relaxed) as u64;
                    cache.loader().load(key).await.unwrap();
                }
            }));
        }
    }
    for worker in join_all(workers).await {
        worker.unwrap();
    }
    let throttled_at = responder
        .throttled_at
        .lock()
        .unwrap()
        .expect("a 429 was sent");
    let arrivals = responder.echo.arrivals.lock().unwrap().clone();
    // Requests already on the wire when the 429 was answered may still land
    // just after it; none may start once the pause is recorded.
    let during_pause: Vec<Duration> = arrivals
        .iter()
        .filter(|t| **t > throttled_at)
        .map(|t| t.duration_since(throttled_at))
        .filter(|d| *d > Duration::from_millis(150) && *d < Duration::from_millis(1900))
        .collect();
    let after = arrivals.iter().filter(|t| **t > throttled_at).count();
    eprintln!(
        "429 at {:?}: {} requests during the 2 s pause, {after} after it",
        throttled_at.duration_since(started),
        during_pause.len()
    );
    assert!(
        during_pause.is_empty(),
        "requests during the pause: {during_pause:?}"
    );
    assert!(
        after > 10,
        "the fleet resumed: {after} requests after the pause"
    );
    let waits: Vec<u64> = caches
        .iter()
        .map(|c| c.stats().rate_limited_waits)
        .collect();
    assert!(
        waits.iter().all(|&w| w > 0),
        "every instance waited: {waits:?}"
    );
    db.cleanup().await;
}

/// An answer whose items lack the id field (a misconfigured `id_field`)
/// fails rather than caching every key as "not found".
#[tokio::test]
async fn items_without_an_id_are_permanent() {
    let err = permanent_failure(
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "items": [{ "uid": 9 }] })),
    )
    .await;
    assert!(
        matches!(err.provider_error::<HttpError>(), Some(HttpError::Decode(why)) if why.contains("`id`")),
        "{err:?}"
    );
}

/// A key containing the separator of the request's id list fails its own
/// loads, with an error naming it; the other keys of its batch are asked
/// for and answered.
#[tokio::test]
async fn a_key_containing_the_separator_fails_only_itself() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/items"))
        .respond_with(Echo::default())
        .expect(1)
        .mount(&server)
        .await;
    let provider: HttpBatchProvider<String, Item> = HttpBatchProvider::new(
        reqwest::Client::new(),
        &format!("{}/items", server.uri()),
        "http/separator",
    )
    .unwrap();
    let cache = Cache::builder(provider).build().unwrap();
    let loader = cache.loader();
    let (one, bad, four) = tokio::join!(
        loader.load("1".to_string()),
        loader.load("2,3".to_string()),
        loader.load("4".to_string())
    );
    assert_eq!(one.unwrap(), Some(item(1)));
    assert_eq!(four.unwrap(), Some(item(4)));
    match bad {
        Err(Error::InvalidKey { key, reason, .. }) => {
            assert_eq!(key, "2,3");
            assert!(reason.contains("comma"), "{reason}");
        }
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    let asked: Vec<Vec<u64>> = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(ids_of)
        .collect();
    assert_eq!(asked, vec![vec![1, 4]]);
}

/// Answers with errors per item, the first time for id 2 only: 2 fails with
/// 503 once, 3 with 400, 4 with 404, 5 does not decode; the rest are items.
#[derive(Clone, Default)]
struct ErrorsPerItem {
    requests: Arc<Mutex<Vec<Vec<u64>>>>,
}

impl Respond for ErrorsPerItem {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let ids = ids_of(request);
        let first = {
            let mut requests = self.requests.lock().unwrap();
            requests.push(ids.clone());
            requests.len() == 1
        };
        let items: Vec<serde_json::Value> = ids
            .into_iter()
            .map(|id| match id {
                2 if first => serde_json::json!({
                    "id": id, "error": {"status": 503, "message": "shard down"}
                }),
                3 => serde_json::json!({"id": id, "error": {"code": 400, "message": "bad id"}}),
                4 => serde_json::json!({"id": id, "error": {"status": 404}}),
                5 => serde_json::json!({"id": id, "name": 5}),
                _ => serde_json::json!(item(id)),
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "items": items }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_fail_alone_fail_only_their_keys() {
    let server = MockServer::start().await;
    let responder = ErrorsPerItem::default();
    Mock::given(method("GET"))
        .respond_with(responder.clone())
        .mount(&server)
        .await;
    let cache = Cache::builder(provider(&server, "http/per-item").item_error_field("error"))
        .retry(quick_retries())
        .build()
        .unwrap();
    let loader = cache.loader();
    let (one, two, three, four, five) = tokio::join!(
        loader.load(1),
        loader.load(2),
        loader.load(3),
        loader.load(4),
        loader.load(5)
    );
    assert_eq!(one.unwrap(), Some(item(1)));
    // A 503 for the item: asked again, alone with the other retryable one.
    assert_eq!(two.unwrap(), Some(item(2)));
    let err = three.unwrap_err();
    assert!(
        matches!(
            err.provider_error::<HttpError>(),
            Some(HttpError::Item { id, status: Some(400), message }) if id == "3" && message == "bad id"
        ),
        "{err:?}"
    );
    assert_eq!(four.unwrap(), None, "a 404 item is not found");
    let err = five.unwrap_err();
    assert!(
        matches!(
            err.provider_error::<HttpError>(),
            Some(HttpError::Decode(_))
        ),
        "{err:?}"
    );
    assert_eq!(
        responder.requests.lock().unwrap().clone(),
        vec![vec![1, 2, 3, 4, 5], vec![2]]
    );
    // Only the failed keys are asked for again; 1, 2 and 4 are cached.
    let loader = cache.loader();
    let (_, _, three, _, five) = tokio::join!(
        loader.load(1),
        loader.load(2),
        loader.load(3),
        loader.load(4),
        loader.load(5)
    );
    assert!(three.is_err() && five.is_err());
    assert_eq!(responder.requests.lock().unwrap()[2], vec![3, 5]);
}
