//! Everything through a real PgBouncer in transaction mode (Debian's
//! package), with `prepared_statements(false)` and the listener on a
//! direct connection: exactly-once across a fleet, lock timeouts,
//! invalidations and their events, and the fleet budget.

mod support;

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use futures::StreamExt;
use loadlock::{Cache, FillMode, Invalidation, LockMode, PgRateLimit, PgStore, Quota};
use support::pg::{PgBouncer, TestDb};
use support::Fake;

async fn exactly_once_through_pgbouncer(fill: FillMode, tag: &str) {
    const INSTANCES: usize = 8;
    let bouncer = PgBouncer::start().await;
    let db = TestDb::new(tag).await;
    let namespace = format!("bouncer/{tag}");
    let provider = Fake::<u64>::builder(namespace.as_str())
        .delay(Duration::from_millis(5))
        .build();
    let mut caches = Vec::new();
    for _ in 0..INSTANCES {
        caches.push(
            Cache::builder(provider.clone())
                .store(db.store_through(&bouncer, LockMode::PerKey, fill).await)
                .build()
                .unwrap(),
        );
    }
    let asked = support::zipf_fleet(&caches, 11).await;
    eprintln!(
        "through pgbouncer, {fill:?}: {} distinct keys, {} fetched",
        asked.len(),
        provider.keys_fetched()
    );
    assert_eq!(provider.keys_fetched(), asked.len());
    assert!(provider.fetches_per_key().values().all(|&n| n == 1));
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_through_pgbouncer() {
    exactly_once_through_pgbouncer(FillMode::Lease, "bouncer_lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn exactly_once_across_8_instances_through_pgbouncer_held_transactions() {
    exactly_once_through_pgbouncer(FillMode::HeldTransaction, "bouncer_held").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_timeout_through_pgbouncer_is_an_error_not_a_hang() {
    let bouncer = PgBouncer::start().await;
    let db = TestDb::new("bouncer_locktimeout").await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&bouncer.url())
        .await
        .unwrap();
    let store = PgStore::builder(pool)
        .table(db.table())
        .lock_timeout(Duration::from_millis(300))
        .prepared_statements(false)
        .listener_url(db.url.clone())
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    support::a_held_lock_times_out(&db, store, "bouncer/locktimeout").await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalidations_and_events_through_pgbouncer() {
    let bouncer = PgBouncer::start().await;
    let db = TestDb::new("bouncer_events").await;
    let provider = Fake::<u64>::new("bouncer/events");
    let writer = Cache::builder(provider.clone())
        .store(
            db.store_through(&bouncer, LockMode::PerKey, FillMode::Lease)
                .await,
        )
        .build()
        .unwrap();
    // A local tier needs events: the listener's direct connection gives them.
    let reader = Cache::builder(provider.clone())
        .store(
            db.store_through(&bouncer, LockMode::PerKey, FillMode::Lease)
                .await,
        )
        .local_tier(100, Duration::from_secs(60))
        .build()
        .unwrap();
    let mut events = reader.invalidations();
    // The listener announces that it is listening with Missed; an
    // invalidation committed before that would go unheard (and show only
    // as that Missed).
    let listening = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    assert_eq!(
        listening.expect("the listener listens"),
        Some(Invalidation::Missed)
    );
    reader.loader().load_many(0..5u64).await.unwrap();
    writer.invalidate([3]).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(Invalidation::Keys(keys)) => return keys,
                Some(_) => {}
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("the event arrives");
    assert_eq!(heard, vec!["3".to_owned()]);
    reader.loader().load_many(0..5u64).await.unwrap();
    assert_eq!(
        provider.fetches_per_key()[&3],
        2,
        "refetched after the event"
    );
    assert_eq!(provider.keys_fetched(), 6);

    // Without a listener URL an unprepared store has no events, and says so
    // where it matters.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&bouncer.url())
        .await
        .unwrap();
    let silent = PgStore::builder(pool)
        .table(db.table())
        .prepared_statements(false)
        .build()
        .unwrap();
    let err = Cache::builder(provider.clone())
        .store(silent)
        .local_tier(100, Duration::from_secs(60))
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("no invalidation events"), "{err}");
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_budget_through_pgbouncer() {
    let bouncer = PgBouncer::start().await;
    let db = TestDb::new("bouncer_budget").await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&bouncer.url())
        .await
        .unwrap();
    let budget = PgRateLimit::with_table(
        pool,
        Quota::per_second(NonZeroU32::new(20).unwrap()),
        &format!("{}.budget", db.schema),
    )
    .unwrap()
    .prepared_statements(false);
    budget.migrate().await.unwrap();
    let provider = Fake::<u64>::new("bouncer/budget");
    let cache = Cache::builder(provider.clone())
        .store(
            db.store_through(&bouncer, LockMode::PerKey, FillMode::Lease)
                .await,
        )
        .fleet_rate_limit(budget)
        .build()
        .unwrap();
    let started = Instant::now();
    for key in 0..5u64 {
        cache.loader().load(key).await.unwrap();
    }
    // 5 calls at 20/s: at least 200 ms between the first and the last.
    assert!(
        started.elapsed() >= Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(provider.call_count(), 5);
    db.cleanup().await;
}
