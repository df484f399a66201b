//! PgStore against a real PostgreSQL: the protocol (locks, re-read,
//! timeouts, round trips), migration, bad input (its conformance suite run
//! is in `conformance.rs`).

mod support;

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use loadlock::store::lock_id;
use loadlock::{Cache, Error, FillMode, LockMode, PgStore, Quota, RetryPolicy};
use sqlx::{Connection, PgConnection};
use support::pg::TestDb;
use support::{value_of, Fake};
use tokio::sync::{Barrier, Semaphore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_migrate_applies_once() {
    let db = TestDb::new("migrate").await;
    let mut stores = Vec::new();
    for _ in 0..8 {
        stores.push(
            PgStore::builder(db.pool(2).await)
                .table(db.table())
                .unlogged(true)
                .build()
                .unwrap(),
        );
    }
    let barrier = Arc::new(Barrier::new(stores.len()));
    let results = join_all(stores.iter().map(|store| {
        let barrier = barrier.clone();
        async move {
            barrier.wait().await;
            store.migrate().await
        }
    }))
    .await;
    for result in results {
        result.expect("every concurrent migrate succeeds");
    }
    // Once more, later: nothing to do, no error.
    stores[0].migrate().await.unwrap();

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let history: Vec<(i32, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, description FROM {}.cache_migrations ORDER BY version",
        db.schema
    )))
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        history,
        vec![
            (1, "cache table".to_string()),
            (2, "entry versions".to_string()),
            (3, "leases and namespace generations".to_string()),
            (4, "lease functions".to_string()),
            (5, "combined claims and publishes".to_string()),
            (
                6,
                "protocol functions find rows by key or row id".to_string()
            ),
            (
                7,
                "claims join provider calls waiting for their turn".to_string()
            ),
            (
                8,
                "claims open calls, and join them by the keys they lease".to_string()
            ),
        ]
    );
    let persistence: String = sqlx::query_scalar(
        "SELECT relpersistence::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = $1 AND c.relname = 'cache'",
    )
    .bind(&db.schema)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(persistence, "u", "created UNLOGGED");
    db.cleanup().await;
}

/// A session plans the protocol's functions once, at its first call, and
/// sessions often start while the table is still empty, when a scan of all
/// of it costs least. Without statistics nothing plans them again as the
/// table grows: a publish or a release that scanned the table would read
/// every row, on every call, for the session's whole life.
#[tokio::test]
async fn publishes_and_releases_never_scan_the_table_whatever_it_held_when_planned() {
    let db = TestDb::new("probes_only").await;
    let _store = db.store(LockMode::PerKey).await;
    let function = |name: &str| format!("\"{}\".\"cache_{name}\"", db.schema);
    let calls = [
        format!(
            "SELECT count(*) FROM {}('ns', ARRAY['k'], ARRAY['1'], ARRAY[1::bigint], 60, 60, \
             'channel', '1s')",
            function("publish_many")
        ),
        format!(
            "SELECT count(*) FROM {}('ns', ARRAY['k'], ARRAY['1'], 1, 60, 60, 'channel', '1s')",
            function("publish")
        ),
        format!(
            "SELECT {}('ns', ARRAY['k'], 1, 'channel', '1s')",
            function("release")
        ),
    ];
    let mut session = PgConnection::connect(&db.url).await.unwrap();
    // Planned on the empty table.
    for call in &calls {
        sqlx::query(sqlx::AssertSqlSafe(call.to_string()))
            .execute(&mut session)
            .await
            .unwrap();
    }
    let mut other = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {}.cache (namespace, key, value, fetched_at, expires_at) \
         SELECT 'ns', g::text, '1', now(), now() + interval '1 hour' \
         FROM generate_series(1, 5000) g",
        db.schema
    )))
    .execute(&mut other)
    .await
    .unwrap();
    for call in &calls {
        let mut tx = session.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(call.to_string()))
            .execute(&mut *tx)
            .await
            .unwrap();
        let scans: i64 = sqlx::query_scalar(
            "SELECT seq_scan FROM pg_stat_xact_user_tables \
             WHERE schemaname = $1 AND relname = 'cache'",
        )
        .bind(&db.schema)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
        assert_eq!(scans, 0, "{call} scanned the whole table");
        tx.rollback().await.unwrap();
    }
    db.cleanup().await;
}

#[tokio::test]
async fn a_missing_table_says_to_migrate() {
    let db = TestDb::new("unmigrated").await;
    let store = PgStore::builder(db.pool(2).await)
        .table(db.table())
        .build()
        .unwrap();
    let cache = Cache::builder(Fake::<u64>::new("pg/unmigrated"))
        .store(store)
        .build()
        .unwrap();
    let err = cache.loader().load(1).await.unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert!(err.to_string().contains("migrate()"), "{err}");
    assert!(err.to_string().contains(&db.table()), "{err}");
    db.cleanup().await;
}

#[tokio::test]
async fn invalid_settings_are_rejected_at_build_time() {
    let db = TestDb::new("badcfg").await;
    let pool = db.pool(1).await;
    for bad in [
        "users; DROP TABLE x",
        "a.b.c",
        "1cache",
        "",
        "cache\"",
        "x y",
    ] {
        let err = PgStore::builder(pool.clone())
            .table(bad)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{bad:?}: {err}");
    }
    assert!(PgStore::builder(pool.clone())
        .lock_timeout(Duration::ZERO)
        .build()
        .is_err());
    assert!(PgStore::builder(pool.clone())
        .max_locks_per_transaction(0)
        .build()
        .is_err());
    assert!(PgStore::builder(pool)
        .table("ok_schema.ok_table")
        .build()
        .is_ok());
    db.cleanup().await;
}

/// `clear` while a key's load waits for its window, then a load of it
/// again: the window holds the key twice, and the store is asked for it
/// once. (Given twice, a store answering by key could count the first copy
/// a miss and open a needless fill.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_cleared_and_loaded_again_in_one_window_is_read_once() {
    let db = TestDb::new("clear_window").await;
    let store = db.store(LockMode::PerKey).await;
    let provider = Fake::<u64>::new("pg/clear-window");
    let cache = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();
    cache.loader().load_many([1, 2]).await.unwrap();
    let trips = store.round_trips();

    let loader = cache.loader();
    let (first, again, all) = tokio::join!(
        loader.load(1),
        async {
            loader.clear(&1);
            loader.load(1).await
        },
        async {
            loader.clear_all();
            loader.load_many([1, 2]).await
        },
    );
    assert_eq!(first.unwrap(), Some(value_of(&1)));
    assert_eq!(again.unwrap(), Some(value_of(&1)));
    assert_eq!(all.unwrap().len(), 2);
    assert_eq!(provider.call_count(), 1);
    assert_eq!(store.round_trips() - trips, 1, "one read, no fill");
    let stats = cache.stats();
    assert_eq!(stats.batches, 2, "{stats:?}");
    assert_eq!(stats.store_hits, 2, "each key read once: {stats:?}");
    db.cleanup().await;
}

/// Claims of fills that queue together go as one statement, whose
/// transaction locks every key it claims: never more than
/// `max_locks_per_transaction` of them, however many fills queue (the
/// server's lock table is shared by every session), and the same for the
/// claim a read makes for the batches it answers. A trigger on the table
/// records the advisory locks each claiming transaction holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_that_combine_stay_within_the_lock_cap() {
    let db = TestDb::new("claim_cap").await;
    let store = PgStore::builder(db.pool(4).await)
        .table(db.table())
        .max_locks_per_transaction(8)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let schema = &db.schema;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {schema}.locks_seen (tx bigint, locks bigint); \
         CREATE FUNCTION {schema}.count_locks() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           INSERT INTO {schema}.locks_seen SELECT txid_current(), count(*) FROM pg_locks \
             WHERE pid = pg_backend_pid() AND locktype = 'advisory'; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER count_locks BEFORE INSERT ON {schema}.cache \
           FOR EACH ROW EXECUTE FUNCTION {schema}.count_locks()"
    )))
    .execute(&mut PgConnection::connect(&db.url).await.unwrap())
    .await
    .unwrap();
    let provider = Fake::<u64>::builder("pg/claim-cap")
        .max_batch(4)
        .delay(Duration::from_millis(20))
        .build();
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    // Rounds of 32 requests of 4 keys each, all at once: the first before
    // any fill told the store its leases (the batches claim for
    // themselves), the others after (their reads claim for them).
    for round in 0..3u64 {
        let barrier = Arc::new(Barrier::new(32));
        let requests = (0..32u64).map(|r| {
            let (cache, barrier) = (cache.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let first = (round * 32 + r) * 4;
                cache.loader().load_many(first..first + 4).await
            })
        });
        for answered in join_all(requests).await {
            assert_eq!(answered.unwrap().unwrap().len(), 4);
        }
    }
    let per_key = provider.fetches_per_key();
    assert_eq!(per_key.len(), 3 * 32 * 4);
    assert!(per_key.values().all(|&n| n == 1), "{per_key:?}");
    let (most_locks, most_rows): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT max(locks), max(n) FROM (SELECT tx, max(locks) AS locks, count(*) AS n \
         FROM {schema}.locks_seen GROUP BY tx) t"
    )))
    .fetch_one(&mut PgConnection::connect(&db.url).await.unwrap())
    .await
    .unwrap();
    // The keys' locks and the namespace's (shared).
    assert!(
        most_locks <= 8 + 1,
        "a claim held {most_locks} advisory locks"
    );
    assert!(
        most_rows > 4,
        "claims of several fills went as one: at most {most_rows} keys per claim"
    );
    db.cleanup().await;
}

/// A fill of more keys than one claim may lock runs in groups, one after
/// the other. When a later group's provider call fails, the keys an earlier
/// group already published are answered with their values, and only the
/// failed group's loads get the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_group_fails_only_its_own_keys() {
    let db = TestDb::new("group_fail").await;
    let store = PgStore::builder(db.pool(4).await)
        .table(db.table())
        .max_locks_per_transaction(2)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let gate = Arc::new(Semaphore::new(0));
    let provider = Fake::<u64>::builder("pg/group-fail")
        .max_batch(2)
        .gate(gate.clone())
        .build();
    let cache = Cache::builder(provider.clone())
        .store(store)
        .retry(RetryPolicy::none())
        .build()
        .unwrap();
    let loader = cache.loader();
    let loads = tokio::spawn(async move {
        let (a, b, c, d) = tokio::join!(
            loader.load(1),
            loader.load(2),
            loader.load(3),
            loader.load(4)
        );
        [a, b, c, d]
    });
    // The first group's call answers; the second's fails.
    gate.add_permits(1);
    while provider.call_count() < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    provider.fail_next(1);
    gate.add_permits(1);
    let [a, b, c, d] = loads.await.unwrap();
    assert_eq!(provider.calls(), vec![vec![1, 2], vec![3, 4]]);
    assert_eq!(a.unwrap(), Some(value_of(&1)));
    assert_eq!(b.unwrap(), Some(value_of(&2)));
    assert!(c.unwrap_err().is_provider());
    assert!(d.unwrap_err().is_provider());

    // Nothing of the failed group was cached; the next load fetches it.
    gate.add_permits(10);
    let again = cache.loader().load_many([1, 2, 3, 4]).await.unwrap();
    assert_eq!(again.len(), 4);
    assert_eq!(provider.calls()[2..], [vec![3, 4]]);
    db.cleanup().await;
}

/// `Cache::write` whose transaction the server ends while the update runs
/// (idle in transaction too long): the update ran, so its output comes back
/// with the error, which says the keys may not be invalidated; the caller
/// invalidates again. A write whose locks cannot be taken did not run its
/// update, and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_invalidation_fails_returns_the_update_output() {
    let db = TestDb::new("write_output").await;
    let store = PgStore::builder(db.pool(4).await)
        .table(db.table())
        .idle_in_transaction_timeout(Duration::from_millis(200))
        .lock_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let provider = Fake::<u64>::new("pg/write-output");
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    cache.loader().load(1).await.unwrap();

    let failed = cache
        .write([1], async {
            tokio::time::sleep(Duration::from_millis(800)).await;
            "updated"
        })
        .await
        .unwrap_err();
    assert!(failed.update_ran(), "{failed}");
    assert_eq!(failed.output, Some("updated"));
    assert!(
        matches!(failed.error, Error::Store { .. }),
        "{:?}",
        failed.error
    );
    cache.invalidate([1]).await.unwrap();
    cache.loader().load(1).await.unwrap();
    assert_eq!(provider.call_count(), 2, "invalidated again, fetched again");

    // Locks held by another instance: the update never runs.
    let holder = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let (entered, go) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let holding = tokio::spawn({
        let (entered, go) = (entered.clone(), go.clone());
        async move {
            holder
                .write([2], async move {
                    entered.add_permits(1);
                    go.acquire().await.unwrap().forget();
                })
                .await
        }
    });
    entered.acquire().await.unwrap().forget();
    let blocked = cache.write([2], async { "never" }).await.unwrap_err();
    assert!(!blocked.update_ran());
    assert!(
        matches!(blocked.error, Error::LockTimeout { .. }),
        "{:?}",
        blocked.error
    );
    go.add_permits(1);
    holding.await.unwrap().unwrap();
    db.cleanup().await;
}

/// A key Postgres cannot store (its text contains NUL) fails its own loads,
/// with an error naming it; the other keys of its batch are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_postgres_cannot_hold_fails_only_itself() {
    let db = TestDb::new("nul_key").await;
    let store = db.store(LockMode::PerKey).await;
    let provider = Fake::<String>::new("pg/nul-key");
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    let loader = cache.loader();
    let bad = "b\0d".to_string();
    let (a, b, c) = tokio::join!(
        loader.load("a".to_string()),
        loader.load(bad.clone()),
        loader.load("c".to_string())
    );
    assert_eq!(a.unwrap(), Some(value_of(&"a")));
    assert_eq!(c.unwrap(), Some(value_of(&"c")));
    match b {
        Err(Error::InvalidKey { key, .. }) => assert_eq!(key, bad),
        other => panic!("expected InvalidKey, got {other:?}"),
    }
    assert_eq!(
        provider.calls(),
        vec![vec!["a".to_string(), "c".to_string()]]
    );
    assert_eq!(cache.stats().batches, 1);
    db.cleanup().await;
}

/// Every invalidation event names its namespace, and a notification holds
/// less than 8,000 bytes: a namespace too long for one is refused when the
/// cache is built, and the longest one accepted, even made of characters
/// JSON escapes, still invalidates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_are_checked_when_the_cache_is_built() {
    let db = TestDb::new("long_ns").await;
    let store = db.store(LockMode::PerKey).await;
    let too_long = "n".repeat(loadlock::MAX_NAMESPACE_LEN + 1);
    let refused = Cache::builder(Fake::<u64>::new(too_long))
        .store(store.clone())
        .build();
    assert!(matches!(refused, Err(Error::Config(_))), "{refused:?}");
    let refused = Cache::builder(Fake::<u64>::new("users\0v1"))
        .store(store.clone())
        .build();
    assert!(matches!(refused, Err(Error::Config(_))), "{refused:?}");

    let longest = "\u{1}".repeat(loadlock::MAX_NAMESPACE_LEN);
    let provider = Fake::<u64>::new(longest);
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    cache.loader().load(1).await.unwrap();
    cache.invalidate([1]).await.unwrap();
    cache.invalidate_namespace().await.unwrap();
    cache.loader().load(1).await.unwrap();
    assert_eq!(provider.call_count(), 2);
    db.cleanup().await;
}

/// A row that no longer decodes into the value type is a miss: refetched,
/// overwritten, counted; never an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_row_is_refetched() {
    let db = TestDb::new("corrupt").await;
    let store = db.store(LockMode::PerKey).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (namespace, key, value, fetched_at, expires_at) \
         VALUES ('pg/corrupt', '7', '{{\"old\": \"shape\"}}', now(), now() + interval '1 hour')",
        db.table()
    )))
    .execute(&mut conn)
    .await
    .unwrap();

    let provider = Fake::<u64>::new("pg/corrupt");
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    assert_eq!(cache.loader().load(7).await.unwrap(), Some(value_of(&7)));
    assert_eq!(provider.calls(), vec![vec![7]]);
    assert_eq!(cache.stats().undecodable, 1);

    let stored: serde_json::Value = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT value FROM {} WHERE namespace = 'pg/corrupt' AND key = '7'",
        db.table()
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(stored, serde_json::json!("v:7"), "overwritten");
    assert_eq!(cache.loader().load(7).await.unwrap(), Some(value_of(&7)));
    assert_eq!(provider.call_count(), 1);
    db.cleanup().await;
}

/// A row whose metadata does not read (written by hand: a negative version,
/// a time no clock can hold) is undecodable: fetched again and counted,
/// never served as version 0 ("primed") or with the epoch as its times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_metadata_does_not_read_is_refetched() {
    let db = TestDb::new("bad_meta").await;
    let store = db.store(LockMode::PerKey).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (namespace, key, value, fetched_at, expires_at, version) VALUES \
         ('pg/bad-meta', '1', '\"hand-written\"', now(), now() + interval '1 hour', -5), \
         ('pg/bad-meta', '2', '\"hand-written\"', '-infinity', now() + interval '1 hour', 3), \
         ('pg/bad-meta', '3', '\"hand-written\"', now(), 'infinity', 4)",
        db.table()
    )))
    .execute(&mut conn)
    .await
    .unwrap();

    let provider = Fake::<u64>::new("pg/bad-meta");
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();
    let loader = cache.loader();
    for key in [1, 2, 3] {
        let entry = loader.load_entry(key).await.unwrap().expect("a value");
        assert_eq!(entry.value, value_of(&key), "key {key} fetched again");
        assert!(entry.version > 0, "key {key}: version {}", entry.version);
        assert!(
            entry.fetched_at > std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 30),
            "key {key}: fetched at {:?}",
            entry.fetched_at
        );
    }
    assert_eq!(provider.keys_fetched(), 3);
    assert_eq!(cache.stats().undecodable, 3);
    db.cleanup().await;
}

/// Rows are plain SQL: the key's Display form, the value as jsonb, NULL for a
/// negative entry, expiry in the future by the database clock.
#[tokio::test]
async fn rows_are_readable_with_plain_sql() {
    let db = TestDb::new("rows").await;
    let store = db.store(LockMode::PerKey).await;
    let provider = Fake::<u64>::builder("pg/rows").not_found([2]).build();
    let cache = Cache::builder(provider)
        .store(store)
        .ttl(Duration::from_secs(600))
        .negative_ttl(Duration::from_secs(60))
        .build()
        .unwrap();
    cache.loader().load_many([1, 2]).await.unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let rows: Vec<(String, Option<serde_json::Value>, f64)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT key, value, extract(epoch FROM expires_at - fetched_at)::float8 \
         FROM {} WHERE namespace = 'pg/rows' ORDER BY key",
            db.table()
        )))
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        rows,
        vec![
            ("1".to_string(), Some(serde_json::json!("v:1")), 600.0),
            ("2".to_string(), None, 60.0),
        ]
    );
    db.cleanup().await;
}

/// Two instances on their own pools, both loading keys 0..10: A first,
/// its provider held at a gate once called; then B.
struct HeldAtTheGate {
    gate: Arc<Semaphore>,
    second: Fake<u64>,
    b: Cache<Fake<u64>>,
    a_load: tokio::task::JoinHandle<Result<std::collections::HashMap<u64, String>, Error>>,
    b_load: tokio::task::JoinHandle<Result<std::collections::HashMap<u64, String>, Error>>,
}

async fn a_at_the_gate_then_b(db: &TestDb, namespace: &str, fill: FillMode) -> HeldAtTheGate {
    let gate = Arc::new(Semaphore::new(0));
    let first = Fake::<u64>::builder(namespace).gate(gate.clone()).build();
    let second = Fake::<u64>::new(namespace);
    let a = Cache::builder(first.clone())
        .store(db.store_with(LockMode::PerKey, fill).await)
        .build()
        .unwrap();
    let b = Cache::builder(second.clone())
        .store(db.store_with(LockMode::PerKey, fill).await)
        .build()
        .unwrap();
    let a_load = tokio::spawn(async move { a.loader().load_many(0..10).await });
    wait_until(|| first.call_count() == 1).await;
    let b_load = tokio::spawn({
        let b = b.clone();
        async move { b.loader().load_many(0..10).await }
    });
    HeldAtTheGate {
        gate,
        second,
        b,
        a_load,
        b_load,
    }
}

/// With held transactions, an instance that waited on another's locks finds
/// the other's rows in its re-read and does not call its provider for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reread_after_lock_finds_the_other_instances_rows() {
    let db = TestDb::new("reread").await;
    let race = a_at_the_gate_then_b(&db, "pg/reread", FillMode::HeldTransaction).await;
    // A holds the locks; B waits for them.
    let ids: Vec<i64> = (0..10u64)
        .map(|k| lock_id("pg/reread", &k.to_string()))
        .collect();
    wait_for_lock_waiters(&db.url, &ids).await;
    race.gate.add_permits(1);

    assert_eq!(race.a_load.await.unwrap().unwrap().len(), 10);
    let got = race.b_load.await.unwrap().unwrap();
    assert_eq!(got[&3], value_of(&3));
    assert_eq!(race.second.call_count(), 0, "B must not call its provider");
    let stats = race.b.stats();
    assert_eq!(stats.store_hits_after_lock, 10);
    assert_eq!(stats.store_hits, 10);
    assert_eq!(stats.lock_waits, 1);
    assert!(stats.lock_wait_max > Duration::ZERO);
    db.cleanup().await;
}

/// With leases, an instance that finds another's live leases waits for its
/// publish (woken by its notification, well before the poll) and does not
/// call its provider; no connection of either instance is held meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leased_key_is_awaited_not_fetched_again() {
    let db = TestDb::new("leasewait").await;
    let race = a_at_the_gate_then_b(&db, "pg/leasewait", FillMode::Lease).await;
    // A holds the leases; B found all ten leased and waits (it looks again
    // on its poll, so the count may grow).
    wait_until(|| race.b.stats().lease_waits >= 10).await;
    // No session of this test's stores sits in a transaction while the
    // provider runs (their last statement names the test's schema).
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let idle_in_transaction: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE state LIKE 'idle in transaction%' AND query LIKE '%' || $1 || '%'",
    )
    .bind(&db.schema)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(idle_in_transaction, 0);
    let leased: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {} WHERE lease_token IS NOT NULL AND lease_waiters",
        db.table()
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(leased, 10, "the leases show, marked as awaited");
    let published = Instant::now();
    race.gate.add_permits(1);

    assert_eq!(race.a_load.await.unwrap().unwrap().len(), 10);
    let got = race.b_load.await.unwrap().unwrap();
    let waited = published.elapsed();
    assert_eq!(got[&3], value_of(&3));
    assert_eq!(race.second.call_count(), 0, "B must not call its provider");
    let stats = race.b.stats();
    assert_eq!(stats.store_hits_after_lock, 10);
    assert_eq!(stats.store_hits, 10);
    eprintln!("B answered {waited:?} after A's publish");
    db.cleanup().await;
}

/// A fill that found keys leased by two holders wakes once both published,
/// and reads them again in one statement: not once per publish, reading
/// and claiming what is still missing in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wait_for_two_holders_ends_with_one_read_after_both_published() {
    let db = TestDb::new("twoholders").await;
    let namespace = "pg/twoholders";
    let holder = |gate: &Arc<Semaphore>| Fake::<u64>::builder(namespace).gate(gate.clone()).build();
    let (gate_a, gate_b) = (Arc::new(Semaphore::new(0)), Arc::new(Semaphore::new(0)));
    let (fake_a, fake_b, fake_c) = (
        holder(&gate_a),
        holder(&gate_b),
        Fake::<u64>::new(namespace),
    );
    let mut caches = Vec::new();
    for fake in [&fake_a, &fake_b, &fake_c] {
        let store = db.store_with(LockMode::PerKey, FillMode::Lease).await;
        let cache = Cache::builder(fake.clone())
            .store(store.clone())
            .build()
            .unwrap();
        caches.push((store, cache));
    }
    let [(_, a), (_, b), (c_store, c)] = &caches[..] else {
        unreachable!()
    };
    // C listens before it waits: a publish is heard, not polled for.
    let mut events = c.invalidations();
    let first = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    assert_eq!(
        first.expect("C listens"),
        Some(loadlock::Invalidation::Missed)
    );

    let a_load = tokio::spawn({
        let a = a.clone();
        async move { a.loader().load(1).await }
    });
    wait_for_calls(&fake_a, 1).await;
    let b_load = tokio::spawn({
        let b = b.clone();
        async move { b.loader().load(2).await }
    });
    wait_for_calls(&fake_b, 1).await;
    let c_load = tokio::spawn({
        let c = c.clone();
        async move { c.loader().load_many([1, 2]).await }
    });
    wait_until(|| c.stats().lease_waits >= 2).await;
    let waiting = c_store.round_trips();

    gate_a.add_permits(1);
    assert_eq!(a_load.await.unwrap().unwrap(), Some(value_of(&1)));
    // Key 1's publish reached C (it marked the key as awaited); key 2 is
    // still leased to B.
    // (Well within the 1 s poll of a wait while the listener listens.)
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!c_load.is_finished());
    assert_eq!(
        c_store.round_trips(),
        waiting,
        "C read or claimed again after the first of its two holders published"
    );

    gate_b.add_permits(1);
    assert_eq!(b_load.await.unwrap().unwrap(), Some(value_of(&2)));
    let got = tokio::time::timeout(Duration::from_secs(5), c_load)
        .await
        .expect("C answered once both published")
        .unwrap()
        .unwrap();
    assert_eq!(got[&1], value_of(&1));
    assert_eq!(got[&2], value_of(&2));
    assert_eq!(c_store.round_trips() - waiting, 1, "one read of both keys");
    assert_eq!(fake_c.call_count(), 0, "C must not call its provider");
    db.cleanup().await;
}

/// A migrated store on a pool of `connections` whose lock timeout is 300 ms.
async fn store_timing_out_locks(db: &TestDb, connections: u32) -> PgStore {
    let store = PgStore::builder(db.pool(connections).await)
        .table(db.table())
        .lock_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    store
}

/// A lock held elsewhere makes a load fail with `LockTimeout` after the
/// configured timeout, not hang; once released, the key loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_is_an_error_not_a_hang() {
    let db = TestDb::new("locktimeout").await;
    let store = store_timing_out_locks(&db, 2).await;
    support::a_held_lock_times_out(&db, store, "pg/locktimeout").await;
    db.cleanup().await;
}

/// The lock timeout bounds a claim as a whole, not each lock it waits for:
/// four keys held by four transactions that let go one after another,
/// each within the timeout of the one before, fail the load with
/// `LockTimeout` (a bound per lock would wait for all four and succeed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_at_most_the_lock_timeout_in_all() {
    let db = TestDb::new("claimbound").await;
    let store = store_timing_out_locks(&db, 4).await;
    let namespace = "pg/claimbound";
    let provider = Fake::<u64>::new(namespace);
    let cache = Cache::builder(provider.clone())
        .store(store)
        .build()
        .unwrap();

    // In the order the claim takes them (ascending lock id), each held by a
    // transaction of its own that commits 250 ms after the one before.
    let mut ids: Vec<i64> = (1..=4u64)
        .map(|key| lock_id(namespace, &key.to_string()))
        .collect();
    ids.sort_unstable();
    let mut holders = Vec::new();
    for id in ids {
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
        holders.push(conn);
    }
    let releases = tokio::spawn(async move {
        for mut conn in holders {
            tokio::time::sleep(Duration::from_millis(250)).await;
            sqlx::query("COMMIT").execute(&mut conn).await.unwrap();
        }
    });

    let err = cache.loader().load_many(1..=4u64).await.unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err:?}");
    assert_eq!(provider.call_count(), 0);

    releases.await.unwrap();
    let got = cache.loader().load_many(1..=4u64).await.unwrap();
    assert_eq!(got.len(), 4);
    assert_eq!(provider.keys_fetched(), 4);
    db.cleanup().await;
}

/// An all-hit batch is one round trip; a miss batch a constant number per
/// lock group, whatever its size.
/// Round trips of a miss batch, per protocol: the read, then per group of
/// keys a claim and a publish (leases), or a transaction of six statements
/// (held transactions).
async fn round_trips_are_constant(fill: FillMode, per_group: u64, tag: &str) {
    let db = TestDb::new(tag).await;
    let store = PgStore::builder(db.pool(2).await)
        .table(db.table())
        .fill_mode(fill)
        .max_locks_per_transaction(1000)
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    // A namespace of its own: advisory locks are database-wide, and the
    // two protocols run this test at the same time.
    let provider = Fake::<u64>::builder(format!("pg/{tag}"))
        .max_batch(500)
        .build();
    let cache = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();

    let measure = |before: u64| store.round_trips() - before;
    for n in [1u64, 100, 1000] {
        let keys: Vec<u64> = (n * 10_000..n * 10_000 + n).collect();
        let before = store.round_trips();
        cache.loader().load_many(keys.clone()).await.unwrap();
        let miss = measure(before);
        let before = store.round_trips();
        cache.loader().load_many(keys).await.unwrap();
        let hit = measure(before);
        eprintln!("{n:>5} keys: all-miss batch {miss} round trips, all-hit batch {hit}");
        assert_eq!(miss, 1 + per_group, "{n} keys");
        assert_eq!(hit, 1, "{n} keys");
    }
    // Past the lock cap, one more group per 1,000 keys.
    let keys: Vec<u64> = (900_000..902_500).collect();
    let before = store.round_trips();
    cache.loader().load_many(keys).await.unwrap();
    assert_eq!(measure(before), 1 + 3 * per_group);
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_are_constant_per_batch_with_leases() {
    // claim, publish
    round_trips_are_constant(FillMode::Lease, 2, "roundtrips_lease").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_are_constant_per_batch_with_held_transactions() {
    // BEGIN, bound, lock, re-read, upsert, COMMIT
    round_trips_are_constant(FillMode::HeldTransaction, 6, "roundtrips_held").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_expired_deletes_in_bounded_batches_without_blocking() {
    let db = TestDb::new("purge").await;
    let store = db.store(LockMode::PerKey).await;
    let short = Cache::builder(Fake::<u64>::new("pg/purge-short"))
        .store(store.clone())
        .ttl(Duration::from_secs(1))
        .build()
        .unwrap();
    let long = Cache::builder(Fake::<u64>::new("pg/purge-long"))
        .store(store.clone())
        .build()
        .unwrap();
    short.loader().load_many(0..30).await.unwrap();
    long.loader().load_many(0..10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    // Another transaction holds one expired row: purge skips it, no waiting.
    let mut holder = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = holder.begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE namespace = 'pg/purge-short' AND key = '0' FOR UPDATE",
        db.table()
    )))
    .execute(&mut *tx)
    .await
    .unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), store.purge_expired(10))
        .await
        .expect("purge does not block on a locked row")
        .unwrap();
    assert_eq!(first, 10);
    let rest = store.purge_expired(1000).await.unwrap();
    assert_eq!(rest, 19, "all expired rows but the locked one");
    tx.rollback().await.unwrap();
    assert_eq!(store.purge_expired(1000).await.unwrap(), 1);

    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        db.table()
    )))
    .fetch_one(&mut holder)
    .await
    .unwrap();
    assert_eq!(left, 10, "fresh rows are kept");
    db.cleanup().await;
}

/// `invalidate_namespace` costs the same whatever the namespace holds: it
/// starts the namespace's next generation (the same round trips whatever
/// its size, no row of the namespace touched), after which every row of the older one is a miss;
/// `purge_expired` reclaims them, and leaves other namespaces alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_invalidation_is_one_row_write_whatever_the_namespace_holds() {
    let db = TestDb::new("ns_generation").await;
    let store = db.store(LockMode::PerKey).await;
    let provider = Fake::<u64>::builder("pg/ns-generation")
        .max_batch(1000)
        .build();
    let cache = Cache::builder(provider.clone())
        .store(store.clone())
        .build()
        .unwrap();
    let other = Cache::builder(Fake::<u64>::new("pg/ns-generation-other"))
        .store(store.clone())
        .build()
        .unwrap();
    other.loader().load_many(0..10).await.unwrap();
    // How many rows a namespace has, and the newest version among them
    // (any row rewritten would have a newer one).
    let rows_of = |namespace: &'static str| {
        let (url, table) = (db.url.clone(), db.table());
        async move {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            sqlx::query_as::<_, (i64, i64)>(sqlx::AssertSqlSafe(format!(
                "SELECT count(*), coalesce(max(version), 0) FROM {table} WHERE namespace = $1"
            )))
            .bind(namespace)
            .fetch_one(&mut conn)
            .await
            .unwrap()
        }
    };
    let mut costs = Vec::new();
    for size in [10u64, 5_000] {
        cache.loader().load_many(0..size).await.unwrap();
        let rows = rows_of("pg/ns-generation").await;
        assert_eq!(rows.0, size as i64);
        let before = store.round_trips();
        cache.invalidate_namespace().await.unwrap();
        costs.push(store.round_trips() - before);
        // No row was deleted or rewritten, yet every one is a miss.
        assert_eq!(rows_of("pg/ns-generation").await, rows);
        let fetched = provider.keys_fetched();
        cache.loader().load_many(0..size).await.unwrap();
        assert_eq!(provider.keys_fetched() - fetched, size as usize);
        cache.invalidate_namespace().await.unwrap();
    }
    assert_eq!(
        costs[0], costs[1],
        "the same round trips for 10 keys and 5,000"
    );

    // The old generations' rows are reclaimed; the other namespace's stay.
    let mut purged = 0;
    loop {
        let n = store.purge_expired(1000).await.unwrap();
        if n == 0 {
            break;
        }
        purged += n;
    }
    assert_eq!(purged, 5_000);
    assert_eq!(rows_of("pg/ns-generation").await.0, 0);
    assert_eq!(rows_of("pg/ns-generation-other").await.0, 10);
    assert_eq!(other.loader().load(3).await.unwrap(), Some(value_of(&3)));
    db.cleanup().await;
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out waiting"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until some session waits for one of the advisory locks `ids`.
async fn wait_for_lock_waiters(url: &str, ids: &[i64]) {
    let mut conn = PgConnection::connect(url).await.unwrap();
    let started = Instant::now();
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND ((classid::bigint << 32) | objid::bigint) = ANY($1)",
        )
        .bind(ids)
        .fetch_one(&mut conn)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "nobody waited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A provider call with its retries must fit in the store's bound on a fill:
/// the longest lease (or a lease would expire under a slow but healthy
/// provider, and another instance would fetch the keys again), or with held
/// transactions the idle-in-transaction timeout (or the server would end the
/// session).
#[tokio::test]
async fn provider_timeout_must_fit_the_fill_bound() {
    for fill in [FillMode::Lease, FillMode::HeldTransaction] {
        provider_timeout_must_fit(fill).await;
    }
}

async fn provider_timeout_must_fit(fill: FillMode) {
    let db = TestDb::new("fillbound").await;
    let store = PgStore::builder(db.pool(1).await)
        .table(db.table())
        .fill_mode(fill)
        .max_lease(Duration::from_secs(20))
        .idle_in_transaction_timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let too_slow = Cache::builder(Fake::<u64>::new("pg/fillbound"))
        .store(store.clone())
        .provider_timeout(Duration::from_secs(10))
        .build()
        .unwrap_err();
    assert!(matches!(too_slow, Error::Config(_)), "{too_slow}");
    assert!(
        too_slow.to_string().contains("provider_timeout"),
        "{too_slow}"
    );
    let fits = Cache::builder(Fake::<u64>::new("pg/fillbound"))
        .store(store)
        .provider_timeout(Duration::from_secs(2))
        .retry(loadlock::RetryPolicy::none())
        .build();
    assert!(fits.is_ok());
    db.cleanup().await;
}

/// Hits never wait for misses: while 8 fills of a 1.5 s provider run on a
/// pool of 4 connections, a load of a key already in the table answers in
/// well under one provider latency (with held transactions it queued
/// behind the fills for the pool's connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hit_never_waits_for_slow_fills() {
    let db = TestDb::new("hitfast").await;
    let store = PgStore::builder(db.pool(4).await)
        .table(db.table())
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let slow = Fake::<u64>::builder("pg/hitfast")
        .delay(Duration::from_millis(1500))
        .build();
    let cache = Cache::builder(slow.clone()).store(store).build().unwrap();
    // Key 0 is in the table; keys 1..=8 are not.
    cache.loader().load(0).await.unwrap();

    let fills: Vec<_> = (1..=8u64)
        .map(|key| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load(key).await })
        })
        .collect();
    wait_until(|| slow.call_count() >= 2).await;
    let asked = Instant::now();
    let hit = cache.loader().load(0).await.unwrap();
    let took = asked.elapsed();
    assert_eq!(hit, Some(value_of(&0)));
    assert_eq!(cache.stats().store_hits, 1);
    eprintln!("a hit answered in {took:?} while 8 fills of a 1.5 s provider ran on 4 connections");
    // It answered while every fill was still at the provider: it did not
    // queue behind them for a connection.
    assert!(
        fills.iter().all(|fill| !fill.is_finished()),
        "the hit (after {took:?}) waited for the fills"
    );
    for fill in fills {
        fill.await.unwrap().unwrap();
    }
    db.cleanup().await;
}

/// Waits (bounded) until `fake` has been called `calls` times.
async fn wait_for_calls(fake: &Fake<u64>, calls: usize) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while fake.call_count() < calls {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the provider was called in time");
}

/// A store on a pool of one connection, and a cache on it whose provider
/// (of a namespace of its own: advisory locks are database-wide, and tests
/// run at the same time) answers only as `gate` lets it.
async fn one_connection(
    db: &TestDb,
    namespace: &str,
    gate: &Arc<Semaphore>,
) -> (sqlx::PgPool, PgStore, Fake<u64>, Cache<Fake<u64>>) {
    let pool = db.pool(1).await;
    let store = PgStore::builder(pool.clone())
        .table(db.table())
        .build()
        .unwrap();
    store.migrate().await.unwrap();
    let fake = Fake::<u64>::builder(namespace)
        .gate(gate.clone())
        .not_found([7])
        .build();
    let cache = Cache::builder(fake.clone())
        .store(store.clone())
        .build()
        .unwrap();
    (pool, store, fake, cache)
}

/// Fills that queue for a connection together publish in one statement,
/// and each gets exactly its own keys' answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fills_that_queue_together_publish_in_one_statement() {
    let db = TestDb::new("combined").await;
    let gate = Arc::new(Semaphore::new(0));
    let (pool, store, fake, cache) = one_connection(&db, "pg/combined", &gate).await;
    let loads: Vec<_> = (0..16_u64)
        .map(|key| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load(key).await })
        })
        .collect();
    // Every fill has claimed its key and is in the provider.
    wait_for_calls(&fake, 16).await;
    // The only connection is taken while the provider answers them all, so
    // their publishes queue together.
    let held = pool.acquire().await.unwrap();
    let before = store.round_trips();
    gate.add_permits(16);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    for (key, load) in (0..16_u64).zip(join_all(loads).await) {
        let expected = (key != 7).then(|| value_of(&key));
        assert_eq!(load.unwrap().unwrap(), expected, "key {key}");
    }
    let publishes = store.round_trips() - before;
    assert!(
        publishes <= 2,
        "16 queued publishes took {publishes} statements"
    );
    assert_eq!(fake.keys_fetched(), 16, "each key fetched once");
    // What they published is what the next loads read.
    let again = cache.loader().load_many(0..16_u64).await.unwrap();
    assert_eq!(again.len(), 15);
    assert_eq!(fake.keys_fetched(), 16);
    db.cleanup().await;
}

/// A combined publish settles each fill on its own: a fill whose lease was
/// revoked meanwhile writes nothing and fetches again, while the fill it
/// was combined with publishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_combined_publish_settles_each_fill_on_its_own() {
    let db = TestDb::new("combined_revoked").await;
    let gate = Arc::new(Semaphore::new(0));
    let (pool, store, fake, cache) = one_connection(&db, "pg/combined_revoked", &gate).await;
    let other = Cache::builder(Fake::<u64>::new("pg/combined_revoked"))
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let loads: Vec<_> = [1_u64, 2]
        .into_iter()
        .map(|key| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load(key).await })
        })
        .collect();
    wait_for_calls(&fake, 2).await;
    let held = pool.acquire().await.unwrap();
    // Another instance invalidates key 1 while it is being fetched.
    other.invalidate([1_u64]).await.unwrap();
    let before = store.round_trips();
    gate.add_permits(3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(held);
    for (key, load) in [1_u64, 2].into_iter().zip(join_all(loads).await) {
        assert_eq!(load.unwrap().unwrap(), Some(value_of(&key)), "key {key}");
    }
    let per_key = fake.fetches_per_key();
    assert_eq!(
        per_key[&1], 2,
        "key 1 fetched again after its lease was revoked"
    );
    assert_eq!(per_key[&2], 1);
    assert_eq!(cache.stats().leases_revoked, 1);
    // One publish for both, then key 1's claim, its publish.
    let statements = store.round_trips() - before;
    assert_eq!(statements, 3, "statements after the provider answered");
    db.cleanup().await;
}

/// Batches that queue for a connection together read in one statement,
/// each receiving exactly its own keys; the claim of what they missed
/// follows on that statement's connection, one statement for all of them
/// (made by the read, the namespace's leases being known from its first
/// fill).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_that_queue_together_read_and_claim_in_one_statement_each() {
    let db = TestDb::new("combined_reads").await;
    let gate = Arc::new(Semaphore::new(0));
    let (pool, store, fake, cache) = one_connection(&db, "pg/combined_reads", &gate).await;
    // Keys 100..108 are in the table already.
    gate.add_permits(1);
    cache.loader().load_many(100..108_u64).await.unwrap();
    assert_eq!(fake.call_count(), 1);

    // The only connection is taken, so the batches queue for it: each asks
    // for a key in the table and a key of its own that is not.
    let held = pool.acquire().await.unwrap();
    let loads: Vec<_> = (0..16_u64)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.loader().load_many([100 + i % 8, i]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = store.round_trips();
    drop(held);
    // Every batch has read and claimed its missing key and is at the
    // provider.
    wait_for_calls(&fake, 17).await;
    let statements = store.round_trips() - before;
    assert!(
        statements <= 3,
        "16 queued batches took {statements} statements to read and claim"
    );
    gate.add_permits(16);
    for (i, load) in (0..16_u64).zip(join_all(loads).await) {
        let got = load.unwrap().unwrap();
        let mut expected = HashMap::from([(100 + i % 8, value_of(&(100 + i % 8)))]);
        if i != 7 {
            expected.insert(i, value_of(&i));
        }
        assert_eq!(got, expected, "batch {i}");
    }
    assert_eq!(fake.keys_fetched(), 8 + 16, "each key fetched once");
    assert_eq!(
        cache.stats().store_hits,
        16,
        "the keys in the table were hits of the combined read"
    );
    db.cleanup().await;
}

/// A read claims what its batch missed, and a batch that then joins
/// another's fill of the key instead (the key is in flight in this
/// process) releases that lease at once: the fill it joined, whose own
/// lease an invalidation revoked meanwhile, claims the key again and gets
/// it, instead of waiting for the unused lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_a_read_claimed_for_nobody_is_released_at_once() {
    let db = TestDb::new("unused_lease").await;
    // One permit: the first fill passes, the next waits at the gate.
    let gate = Arc::new(Semaphore::new(1));
    let provider = Fake::<u64>::builder("pg/unused-lease")
        .gate(gate.clone())
        .build();
    let cache = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    // A first fill: from now on this store's reads claim what they miss.
    cache.loader().load(100).await.unwrap();
    // A leads key 1 and waits at the gate.
    let a = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(1).await }
    });
    wait_for_calls(&provider, 2).await;
    // The invalidation revokes A's lease: key 1 is missing and unleased.
    cache.invalidate([1]).await.unwrap();
    // B's read claims key 1; B then joins A's fill, still in flight.
    let b = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(1).await }
    });
    wait_until(|| cache.stats().coalesced == 1).await;
    // A's publish is refused (its lease was revoked); it claims the key
    // again and fetches it, answering B too.
    gate.add_permits(2);
    let bounded = |load| tokio::time::timeout(Duration::from_secs(10), load);
    let a = bounded(a)
        .await
        .expect("A is not held until a lease expires");
    let b = bounded(b).await.expect("B is answered with A");
    assert_eq!(a.unwrap().unwrap(), Some(value_of(&1)));
    assert_eq!(b.unwrap().unwrap(), Some(value_of(&1)));
    let stats = cache.stats();
    assert_eq!(stats.lease_takeovers, 0, "no lease was left to expire");
    assert_eq!(stats.leases_revoked, 1);
    assert_eq!(
        provider.call_count(),
        3,
        "the first fill, A's revoked fetch, A again"
    );
    db.cleanup().await;
}

/// A fetch that waits for rate-limit budget longer than its lease keeps
/// the lease (it is renewed while the fetch runs): another instance waits
/// for its publish instead of taking the key over, and the key is fetched
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_outlives_a_rate_limit_wait_longer_than_itself() {
    let db = TestDb::new("lease_renewal").await;
    let fake = Fake::<u64>::new("pg/renewal");
    // One call per 4 s: the second call waits about 4 s for budget, while
    // its lease covers a 100 ms fetch and the lease's margin (2 s).
    let once_per_4s =
        Quota::per_period(NonZeroU32::new(1).unwrap(), Duration::from_secs(4)).unwrap();
    let slow = Cache::builder(fake.clone())
        .store(db.store(LockMode::PerKey).await)
        .provider_timeout(Duration::from_millis(100))
        .retry(RetryPolicy::none())
        .rate_limit_calls(once_per_4s)
        .build()
        .unwrap();
    let other = Cache::builder(fake.clone())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    slow.loader().load(1).await.unwrap();
    let waiting = tokio::spawn({
        let slow = slow.clone();
        async move { slow.loader().load(2).await }
    });
    // Past the lease the claim took (100 ms, a tenth more, and 2 s).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!waiting.is_finished(), "the fetch still waits for budget");
    assert_eq!(other.loader().load(2).await.unwrap(), Some(value_of(&2)));
    assert_eq!(waiting.await.unwrap().unwrap(), Some(value_of(&2)));
    assert_eq!(
        fake.fetches_per_key()[&2],
        1,
        "key 2 fetched once: its lease outlived the wait"
    );
    assert_eq!(other.stats().lease_takeovers, 0);
    assert!(other.stats().lease_waits >= 1, "the other instance waited");
    db.cleanup().await;
}

/// With leases the fleet budget is charged when a call is made, after the
/// claim, for keys this instance leased: 8 instances missing the same key
/// at once under a budget of one call per 2 s make one call, and none of
/// them waits for budget (charged before the claim, as held transactions
/// must, seven would wait 2 s each for a call they never make). The budget
/// binds: the next call, for another key, waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_fleet_budget_pays_only_for_calls_made() {
    let db = TestDb::new("budget_after_claim").await;
    let fake = Fake::<u64>::builder("pg/budget-after-claim")
        .delay(Duration::from_millis(200))
        .build();
    let once_per_2s =
        Quota::per_period(NonZeroU32::new(1).unwrap(), Duration::from_secs(2)).unwrap();
    let caches = budgeted(&db, &fake, once_per_2s, 8).await;
    let barrier = Arc::new(Barrier::new(caches.len()));
    let loads = caches.iter().map(|cache| {
        let (cache, barrier) = (cache.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            cache.loader().load(7).await
        })
    });
    // Bounded: charged before the claim, the last would wait 14 s.
    let answers = tokio::time::timeout(Duration::from_secs(30), join_all(loads))
        .await
        .expect("every instance answered");
    for answer in answers {
        assert_eq!(answer.unwrap().unwrap(), Some(value_of(&7)));
    }
    assert_eq!(fake.calls(), vec![vec![7]]);
    let waited: u64 = caches.iter().map(|c| c.stats().rate_limited_waits).sum();
    assert_eq!(waited, 0, "an instance waited for budget it did not spend");
    assert_eq!(
        caches[0].loader().load(8).await.unwrap(),
        Some(value_of(&8))
    );
    assert_eq!(
        caches[0].stats().rate_limited_waits,
        1,
        "the second call waits for the budget"
    );
    db.cleanup().await;
}

/// `n` instances of `provider`, each a cache on a store and a fleet budget
/// of its own pool, sharing the budget `quota` (in the test's budget table).
async fn budgeted<P>(db: &TestDb, provider: &P, quota: Quota, n: usize) -> Vec<Cache<P>>
where
    P: loadlock::BatchFetch + Clone,
    P::Value: serde::Serialize + serde::de::DeserializeOwned,
{
    let mut caches = Vec::new();
    for _ in 0..n {
        caches.push(
            Cache::builder(provider.clone())
                .store(db.store(LockMode::PerKey).await)
                .fleet_rate_limit(db.budget(quota).await)
                .build()
                .unwrap(),
        );
    }
    caches
}

/// A load spawned on its own task.
type Load = tokio::task::JoinHandle<Result<Option<String>, Error>>;

/// Waits (30 s at most) for each load, and checks it answered its key's
/// value.
async fn answered(loads: Vec<(u64, Load)>) {
    for (key, load) in loads {
        let answer = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("every load answered");
        assert_eq!(answer.unwrap().unwrap(), Some(value_of(&key)));
    }
}

/// The namespace of the fleet budget's turns in the tests below.
const TURNS: &str = "pg/budget-turns";

/// The instant the fleet budget's GCRA row has reached, read until it
/// moves past `seen` (a call was charged or took a turn), for `patience` at
/// most.
async fn budget_moved(
    conn: &mut PgConnection,
    table: &str,
    seen: Option<f64>,
    patience: Duration,
) -> Option<f64> {
    let deadline = Instant::now() + patience;
    loop {
        let tat: Option<f64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT extract(epoch FROM tat)::float8 FROM {table} WHERE namespace = '{TURNS}'"
        )))
        .fetch_optional(&mut *conn)
        .await
        .unwrap();
        if let Some(tat) = tat.filter(|&t| seen.is_none_or(|seen| t > seen)) {
            return Some(tat);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `query` (a boolean, its parameters `binds` as text) every 2 ms
/// until it answers true, for 10 s at most; past that fails saying `what`.
async fn until_true(conn: &mut PgConnection, query: &str, binds: &[String], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut check = sqlx::query_scalar::<_, bool>(sqlx::AssertSqlSafe(query));
        for bind in binds {
            check = check.bind(bind);
        }
        if check.fetch_one(&mut *conn).await.unwrap() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits (10 s at most) until `key` of the budget test's namespace is
/// leased: its fill claimed it, and asks the budget next.
async fn leased(conn: &mut PgConnection, table: &str, key: u64) {
    let query = format!(
        "SELECT EXISTS (SELECT 1 FROM {table} WHERE namespace = '{TURNS}' \
           AND key = $1 AND lease_token IS NOT NULL)"
    );
    let what = format!("key {key} was never leased");
    until_true(conn, &query, &[key.to_string()], &what).await;
}

/// Calls that find the fleet budget spent take its turns in the order they
/// asked, whichever instance they run on, instead of all asking again at
/// the same moment and racing for each turn: 8 instances, one call each,
/// each asking once the one before it asked (its key leased and its turn
/// taken, or 50 ms after the lease if the budget does not move), under a
/// budget of 10 calls/s, call the provider in that order, a turn (100 ms)
/// apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fleet_budget_turns_go_in_the_order_calls_asked() {
    let db = TestDb::new("budget_turns").await;
    let provider = Fake::<u64>::new(TURNS);
    let table = db.budget_table();
    let ten_per_second = Quota::per_second(NonZeroU32::new(10).unwrap());
    let caches = budgeted(&db, &provider, ten_per_second, 8).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    let mut seen = None;
    let mut loads = Vec::new();
    for (key, cache) in (0u64..).zip(&caches) {
        let cache = cache.clone();
        loads.push((
            key,
            tokio::spawn(async move { cache.loader().load(key).await }),
        ));
        leased(&mut conn, &db.table(), key).await;
        // A budget that made waiting calls ask again later would not move
        // for them: the next call then starts 50 ms on, and they race.
        seen = budget_moved(&mut conn, &table, seen, Duration::from_millis(50))
            .await
            .or(seen);
    }
    answered(loads).await;
    assert_eq!(
        provider.calls(),
        (0..8).map(|k| vec![k]).collect::<Vec<_>>()
    );
    // The budget still binds: seven turns after the first, less a margin
    // for when each call woke.
    let started = provider.call_times();
    let span = started[7] - started[0];
    assert!(span >= Duration::from_millis(650), "8 calls in {span:?}");
    let waited: u64 = caches.iter().map(|c| c.stats().rate_limited_waits).sum();
    assert_eq!(waited, 7, "every call but the first waited for its turn");
    db.cleanup().await;
}

/// A pause the provider asks for holds a call that took its turn before
/// the pause was recorded: its turn comes during the pause, and it waits
/// the pause out (and takes a new turn) instead of calling then.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_pause_holds_a_call_that_took_its_turn_before_it() {
    let db = TestDb::new("budget_pause").await;
    // Calls wait for the test; the first is refused with a 429 (retry
    // after 1 s).
    let gate = Arc::new(Semaphore::new(0));
    let provider = Fake::<u64>::builder(TURNS)
        .gate(gate.clone())
        .failures(loadlock::ErrorClass::RateLimited {
            retry_after: Some(Duration::from_secs(1)),
        })
        .build();
    provider.fail_next(1);
    let table = db.budget_table();
    let one_per_400ms = Quota::per_period(NonZeroU32::MIN, Duration::from_millis(400)).unwrap();
    let caches = budgeted(&db, &provider, one_per_400ms, 2).await;
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    // A is charged and calls; its call waits for the test.
    let a = caches[0].clone();
    let refused = tokio::spawn(async move { a.loader().load(100).await });
    let charged = budget_moved(&mut conn, &table, None, Duration::from_secs(10))
        .await
        .expect("A was charged");
    // B finds the budget spent and takes the next turn, 400 ms on.
    let b = caches[1].clone();
    let waiting = tokio::spawn(async move { b.loader().load(1).await });
    budget_moved(&mut conn, &table, Some(charged), Duration::from_secs(10))
        .await
        .expect("B took a turn");
    // Now the provider refuses A's call: the fleet pauses for 1 s from
    // then, past B's turn.
    let released = Instant::now();
    gate.add_permits(8);
    answered(vec![(100, refused), (1, waiting)]).await;
    let calls = provider.calls();
    let b_call = calls
        .iter()
        .position(|keys| keys == &[1])
        .expect("B called");
    let b_called = provider.call_times()[b_call];
    assert!(
        b_called >= released + Duration::from_millis(950),
        "B called {:?} after the 429 that paused the fleet for 1 s",
        b_called.duration_since(released)
    );
    db.cleanup().await;
}

/// The namespace of the shared-call tests below.
const SHARED: &str = "pg/shared-calls";

/// The instances of a shared-call test, warmed up (see [`warmed`]).
struct SharingFleet {
    db: TestDb,
    /// Shared by the instances, and counting their calls.
    provider: Fake<u64>,
    caches: Vec<Cache<Fake<u64>>>,
    /// For the test's own checks.
    conn: PgConnection,
}

/// `n` instances of a provider of [`SHARED`] that parses keys with
/// `parse`, under one fleet budget of `per_second` calls, on the test
/// database `name`.
async fn sharing_fleet(
    name: &str,
    parse: fn(&str) -> Option<u64>,
    per_second: u32,
    n: usize,
) -> SharingFleet {
    let provider = Fake::<u64>::builder(SHARED).parse_keys(parse).build();
    sharing_fleet_of(name, provider, per_second, n).await
}

/// [`sharing_fleet`] of `provider` (of [`SHARED`]).
async fn sharing_fleet_of(
    name: &str,
    provider: Fake<u64>,
    per_second: u32,
    n: usize,
) -> SharingFleet {
    let db = TestDb::new(name).await;
    let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap());
    let caches = budgeted(&db, &provider, quota, n).await;
    let conn = PgConnection::connect(&db.url).await.unwrap();
    warmed(&caches).await;
    SharingFleet {
        db,
        provider,
        caches,
        conn,
    }
}

/// Waits (10 s at most) until a call of the shared-call tests' namespace
/// is open: claims may join it until its turn.
async fn opened(conn: &mut PgConnection, table: &str) {
    let query = format!("SELECT count(*) > 0 FROM {table}_calls WHERE namespace = '{SHARED}'");
    until_true(conn, &query, &[], "no call was ever opened").await;
}

/// Waits (10 s at most) until `key` is leased to the token of `call`'s
/// key: its claim joined that call.
async fn joined(conn: &mut PgConnection, table: &str, key: u64, call: u64) {
    let query = format!(
        "SELECT coalesce((SELECT k.lease_token = c.lease_token FROM {table} k, {table} c \
           WHERE k.namespace = '{SHARED}' AND c.namespace = '{SHARED}' \
             AND k.key = $1 AND c.key = $2), false)"
    );
    let what = format!("key {key} never joined the call of key {call}");
    until_true(conn, &query, &[key.to_string(), call.to_string()], &what).await;
}

/// Each instance's first fill, of a key of its own (100, 101, …), one
/// after another: the connections and listeners an instance opens at its
/// first fill are open before the test's calls.
async fn warmed(caches: &[Cache<Fake<u64>>]) {
    for (key, cache) in (100u64..).zip(caches) {
        answered(vec![spawn_load(cache, key)]).await;
    }
}

/// Nothing of the shared calls is left: no call open, no key leased (the
/// failure names what is).
async fn nothing_left_open(conn: &mut PgConnection, table: &str) {
    let calls: Vec<(i64, Vec<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT token, keys FROM {table}_calls ORDER BY token"
    )))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let leased: Vec<(String, String, i64, Option<String>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT namespace, key, lease_token, lease_holder FROM {table} \
         WHERE lease_token IS NOT NULL ORDER BY namespace, key"
        )))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    assert!(
        calls.is_empty() && leased.is_empty(),
        "calls open (token, keys): {calls:?}; keys leased (namespace, key, token, holder): {leased:?}"
    );
}

/// Spawns a load of `key` on `cache`.
fn spawn_load(cache: &Cache<Fake<u64>>, key: u64) -> (u64, Load) {
    let cache = cache.clone();
    (
        key,
        tokio::spawn(async move { cache.loader().load(key).await }),
    )
}

/// Under a fleet budget, a call that waits for its turn carries the keys
/// other instances start missing meanwhile: they join it instead of taking
/// turns of their own, and each key is fetched once. With the budget's
/// turns spent (5 calls/s), instance 1's call, opened by its claim,
/// waits about 200 ms for the next; instances 2 and 3 miss a key each
/// while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_call_carries_keys_other_instances_missed() {
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet("shared_calls", |text| text.parse().ok(), 5, 4).await;
    binding(&caches[1], 104).await;
    let waiting = spawn_load(&caches[1], 1);
    opened(&mut conn, &db.table()).await;
    let others = vec![spawn_load(&caches[2], 2), spawn_load(&caches[3], 3)];
    joined(&mut conn, &db.table(), 2, 1).await;
    joined(&mut conn, &db.table(), 3, 1).await;
    answered(std::iter::once(waiting).chain(others).collect()).await;
    assert_eq!(
        provider.calls(),
        [warmed_and_bound(4), vec![vec![1, 2, 3]]].concat()
    );
    assert_eq!(caches[1].stats().carried_keys, 2);
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// A key that joined a call which cannot carry it (its provider cannot
/// parse its text) is released at the call's turn, not left to its lease's
/// expiry: the instance that missed it claims it again and fetches it
/// itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_a_waiting_call_cannot_carry_is_released_to_its_instance() {
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet(
        "shared_unparsed",
        |text| text.parse().ok().filter(|&key| key != 3),
        5,
        3,
    )
    .await;
    binding(&caches[1], 104).await;
    let waiting = spawn_load(&caches[1], 1);
    opened(&mut conn, &db.table()).await;
    let started = Instant::now();
    let unparsed = spawn_load(&caches[2], 3);
    joined(&mut conn, &db.table(), 3, 1).await;
    answered(vec![waiting, unparsed]).await;
    answered_soon(started, 3);
    assert_eq!(
        provider.calls(),
        [warmed_and_bound(3), vec![vec![1], vec![3]]].concat()
    );
    assert_eq!(caches[1].stats().carried_keys, 0);
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// The calls of a shared-call test's first `instances` warm-up loads
/// (100, 101, …, see [`warmed`]) and of `binding(&caches[1], 104)`.
fn warmed_and_bound(instances: u64) -> Vec<Vec<u64>> {
    (100..100 + instances)
        .chain([104, 105])
        .map(|key| vec![key])
        .collect()
}

/// Checks that a key asked at `started`, whose lease another instance's
/// call held and gave up, was answered long before that lease (sized for
/// the default provider timeout and retries: tens of seconds) would have
/// expired.
fn answered_soon(started: Instant, key: u64) {
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "key {key} answered {:?} after it was asked",
        started.elapsed()
    );
}

/// Loads of `key` and then `key + 1` on `cache`, under a budget of 5
/// calls/s: the second call waits for its turn (about 200 ms after the
/// first's), and from that turn on, for a second, the cache takes the
/// budget to bind and its claims open their calls to the fleet.
async fn binding(cache: &Cache<Fake<u64>>, key: u64) {
    answered(vec![spawn_load(cache, key)]).await;
    let started = Instant::now();
    answered(vec![spawn_load(cache, key + 1)]).await;
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "key {}'s call waited for its turn",
        key + 1
    );
}

/// Holds the fleet budget's row of the shared-call tests' namespace
/// locked, in a transaction of the returned connection, until it is
/// closed: every call asking for a turn meanwhile waits for it, after its
/// claim.
async fn budget_held(db: &TestDb) -> PgConnection {
    let (url, table) = (&db.url, db.budget_table());
    let mut conn = PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql("BEGIN").execute(&mut conn).await.unwrap();
    let locked: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM (SELECT 1 FROM {table} WHERE namespace = '{SHARED}' FOR UPDATE) l"
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(
        locked, 1,
        "the budget's row exists once the instances warmed up"
    );
    conn
}

/// A call is open to the fleet from the claim of its keys on, not only once
/// it knows its turn: a key another instance misses between the claim and
/// the turn rides on it. The budget's row is held locked while the test's
/// loads come, so the first call has claimed its key and waits for the
/// budget's answer when the second instance misses key 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_is_open_to_the_fleet_from_its_claim_on() {
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet("shared_open", |text| text.parse().ok(), 5, 3).await;
    binding(&caches[1], 104).await;
    let budget = budget_held(&db).await;
    let first = spawn_load(&caches[1], 1);
    opened(&mut conn, &db.table()).await;
    let second = spawn_load(&caches[2], 2);
    joined(&mut conn, &db.table(), 2, 1).await;
    budget.close().await.unwrap();
    answered(vec![first, second]).await;
    assert_eq!(
        provider.calls(),
        [warmed_and_bound(3), vec![vec![1, 2]]].concat()
    );
    assert_eq!(caches[1].stats().carried_keys, 1);
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// A fill whose claim opened a call and whose keys ride on another call
/// of its process publishes nothing the invalidation of one of its keys
/// revoked while that call fetched, even when another instance's claim
/// joined the key to the fill's still-open call, leasing it to the same
/// token again. Instance 1's first fill (keys 1–5) opens a call and waits
/// for its turn (the budget's row is held); instance 2's claim of 95 keys
/// fills that call; instance 1's next fill (keys 200–209) finds no room
/// in it, opens its own, and rides on the first fill's call, which the
/// provider holds while key 200 is invalidated and instance 0 misses it.
/// Key 200 must be fetched again: the value fetched before the
/// invalidation is not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_fetched_before_an_invalidation_is_not_published_under_a_retaken_lease() {
    // Permits for the warm-up's 3 calls and `binding`'s 2.
    let gate = Arc::new(Semaphore::new(5));
    let provider = Fake::<u64>::builder(SHARED)
        .parse_keys(|text| text.parse().ok())
        .gate(gate.clone())
        .build();
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet_of("shared_ride", provider, 5, 3).await;
    let table = db.table();
    binding(&caches[1], 104).await;
    let budget = budget_held(&db).await;
    let many = |cache: &Cache<Fake<u64>>, keys: std::ops::Range<u64>| {
        let cache = cache.clone();
        tokio::spawn(async move { cache.loader().load_many(keys).await })
    };
    let first = many(&caches[1], 1..6);
    opened(&mut conn, &table).await;
    let filling = many(&caches[2], 10..105);
    joined(&mut conn, &table, 10, 1).await;
    let riding = many(&caches[1], 200..210);
    let riding_opened = format!(
        "SELECT (SELECT count(*) FROM {table} WHERE namespace = '{SHARED}' \
                   AND key = '200' AND lease_token IS NOT NULL) = 1 \
            AND (SELECT count(*) FROM {table}_calls WHERE namespace = '{SHARED}') = 2"
    );
    until_true(
        &mut conn,
        &riding_opened,
        &[],
        "the riding fill opened no call",
    )
    .await;
    budget.close().await.unwrap();
    // The first call (with the riding fill's keys) asks the provider, which
    // holds it; meanwhile key 200 is invalidated and instance 0 misses it,
    // joining it to the riding fill's call.
    wait_for_calls(&provider, 6).await;
    caches[0].invalidate([200]).await.unwrap();
    let missing = spawn_load(&caches[0], 200);
    let rejoined = format!(
        "SELECT count(*) = 1 FROM {table} c JOIN {table}_calls k ON k.token = c.lease_token \
          WHERE c.namespace = '{SHARED}' AND c.key = '200'"
    );
    until_true(
        &mut conn,
        &rejoined,
        &[],
        "key 200 never joined the riding fill's call",
    )
    .await;
    gate.add_permits(1000);
    for (load, keys) in [(first, 1..6), (filling, 10..105), (riding, 200..210)] {
        let got = tokio::time::timeout(Duration::from_secs(30), load)
            .await
            .expect("every load answered")
            .unwrap()
            .unwrap();
        for key in keys {
            assert_eq!(got[&key], value_of(&key));
        }
    }
    answered(vec![missing]).await;
    assert_eq!(
        provider.fetches_per_key()[&200],
        2,
        "key 200 was not fetched again after its invalidation"
    );
    nothing_left_open(&mut conn, &table).await;
    db.cleanup().await;
}

/// While the fleet's budget does not bind (no call of the cache waited
/// for its turn lately), claims open no calls: a call goes as soon as its
/// turn is known, and joining it would only add a round trip to the
/// joiner. Two instances missing a key each then make a call each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_call_is_opened_while_the_budget_does_not_bind() {
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet("shared_unbound", |text| text.parse().ok(), 1000, 3).await;
    let budget = budget_held(&db).await;
    let first = spawn_load(&caches[1], 1);
    let second = spawn_load(&caches[2], 2);
    for key in [1, 2] {
        let leased = format!(
            "SELECT EXISTS (SELECT 1 FROM {} WHERE namespace = '{SHARED}' AND key = $1 \
               AND lease_token IS NOT NULL)",
            db.table()
        );
        until_true(
            &mut conn,
            &leased,
            &[key.to_string()],
            "a key was never leased",
        )
        .await;
    }
    let open: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}_calls",
        db.table()
    )))
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(open, 0, "a call was opened while the budget did not bind");
    budget.close().await.unwrap();
    answered(vec![first, second]).await;
    let mut calls = provider.calls();
    calls.sort();
    assert_eq!(
        calls,
        vec![vec![1], vec![2], vec![100], vec![101], vec![102]]
    );
    assert_eq!(
        caches[1].stats().carried_keys + caches[2].stats().carried_keys,
        0
    );
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// A fill that fails after its claim opened its call, before the call's
/// turn (here: its connection to the fleet budget is terminated while it
/// asks for the turn), closes the call and releases the keys that joined
/// it at once: the instance that missed one claims it again and fetches
/// it itself, instead of waiting for the lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_that_fails_before_its_turn_releases_what_joined_it() {
    let SharingFleet {
        db,
        provider,
        caches,
        mut conn,
    } = sharing_fleet("shared_cancel", |text| text.parse().ok(), 5, 3).await;
    binding(&caches[1], 104).await;
    let budget = budget_held(&db).await;
    let (_, failing) = spawn_load(&caches[1], 1);
    opened(&mut conn, &db.table()).await;
    let started = Instant::now();
    let second = spawn_load(&caches[2], 2);
    joined(&mut conn, &db.table(), 2, 1).await;
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
           WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%_reserve%') t",
    )
    .bind(&db.schema)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(terminated, 1, "one call waits for the budget: key 1's");
    let failed = tokio::time::timeout(Duration::from_secs(30), failing)
        .await
        .expect("the load of key 1 answered")
        .unwrap();
    assert!(
        matches!(failed, Err(Error::Store { .. })),
        "key 1's load fails with its budget's connection: {failed:?}"
    );
    budget.close().await.unwrap();
    answered(vec![second]).await;
    answered_soon(started, 2);
    assert_eq!(
        provider.calls(),
        [warmed_and_bound(3), vec![vec![2]]].concat()
    );
    assert_eq!(caches[1].stats().carried_keys, 0);
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// A fill that opened a call and never makes it closes it: here a
/// background refresh of keys 1 and 2, whose claim leases key 1 (opening
/// its call) but finds key 2 leased by another instance, and gives up. No
/// call is left open for other instances to join and wait on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refresh_that_gives_up_closes_the_call_its_claim_opened() {
    let db = TestDb::new("shared_refresh").await;
    let provider = Fake::<u64>::builder(SHARED)
        .parse_keys(|text| text.parse().ok())
        .build();
    let budget = db
        .budget(Quota::per_second(NonZeroU32::new(5).unwrap()))
        .await;
    let refreshing = Cache::builder(provider.clone())
        .store(db.store(LockMode::PerKey).await)
        .fleet_rate_limit(budget)
        .ttl(Duration::from_secs(1))
        .stale_while_revalidate(Duration::from_secs(60))
        .build()
        .unwrap();
    // Another instance, whose fill of key 2 holds its lease until the gate
    // opens.
    let gate = Arc::new(Semaphore::new(0));
    let holding = Cache::builder(Fake::<u64>::builder(SHARED).gate(gate.clone()).build())
        .store(db.store(LockMode::PerKey).await)
        .build()
        .unwrap();
    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    refreshing.loader().load_many([1, 2]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, held) = spawn_load(&holding, 2);
    let leased = format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE namespace = '{SHARED}' AND key = '2' \
           AND lease_token IS NOT NULL)",
        db.table()
    );
    until_true(&mut conn, &leased, &[], "key 2 was never leased").await;
    // Keys 3 and 4 after it: the second waits for its turn, and the cache
    // takes the budget to bind.
    binding(&refreshing, 3).await;
    // Stale, served at once; the refresh claims in the background. Its
    // claim draws a token before it commits its leases (and opens its
    // call): until it answered, which the cache counts, nothing of it
    // shows in the tables yet.
    let claims_before = refreshing.stats().lock_waits;
    refreshing.loader().load_many([1, 2]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while refreshing.stats().lock_waits == claims_before {
        assert!(
            Instant::now() < deadline,
            "the refresh's claim never answered"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let closed = format!(
        "SELECT NOT EXISTS (SELECT 1 FROM {table}_calls) AND NOT EXISTS (SELECT 1 FROM {table} \
           WHERE namespace = '{SHARED}' AND key = '1' AND lease_token IS NOT NULL)",
        table = db.table()
    );
    until_true(&mut conn, &closed, &[], "the refresh's call was left open").await;
    gate.add_permits(1);
    tokio::time::timeout(Duration::from_secs(30), held)
        .await
        .expect("key 2 answered")
        .unwrap()
        .unwrap();
    // Nothing was refreshed: the refresh made no call.
    assert_eq!(provider.calls(), vec![vec![1, 2], vec![3], vec![4]]);
    assert_eq!(refreshing.stats().refreshes, 0);
    nothing_left_open(&mut conn, &db.table()).await;
    db.cleanup().await;
}

/// A fill whose provider call fails releases its leases at once, on
/// Postgres too: another instance waiting for the key claims it then (see
/// `support::a_failed_fill_releases_its_leases_at_once`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_fill_releases_its_leases_at_once() {
    let db = TestDb::new("release").await;
    let (first, second) = (
        db.store(LockMode::PerKey).await,
        db.store(LockMode::PerKey).await,
    );
    support::a_failed_fill_releases_its_leases_at_once(first, second, "pg/release").await;
    db.cleanup().await;
}

/// A provider whose answer depends on the tenant: safe to cache only with
/// the tenant in the namespace.
#[derive(Clone)]
struct TenantUsers {
    tenant: &'static str,
    namespace: String,
}

impl TenantUsers {
    fn new(tenant: &'static str, tag: &str) -> Self {
        TenantUsers {
            tenant,
            namespace: format!("users/{tag}/{tenant}"),
        }
    }
}

#[async_trait::async_trait]
impl loadlock::BatchFetch for TenantUsers {
    type Key = u64;
    type Value = String;
    type Error = std::io::Error;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, String>, std::io::Error> {
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(keys
            .iter()
            .map(|&id| (id, format!("{}'s user {id}", self.tenant)))
            .collect())
    }
}

/// Two tenants loading the same ids at once, through one shared store (and
/// two instances each): every load sees its own tenant's value, never the
/// other's, on both stores.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_with_a_namespace_each_never_see_each_other() {
    let db = TestDb::new("tenants").await;
    let pg = db.store(LockMode::PerKey).await;
    let memory = loadlock::MemoryStore::new();
    for (tag, stores) in [
        (
            "pg",
            [pg.clone(), db.store(LockMode::PerKey).await]
                .map(|s| Arc::new(s) as Arc<dyn loadlock::Store<TenantUsers>>),
        ),
        (
            "memory",
            [memory.clone(), memory.clone()]
                .map(|s| Arc::new(s) as Arc<dyn loadlock::Store<TenantUsers>>),
        ),
    ] {
        let mut caches = Vec::new();
        for tenant in ["acme", "globex"] {
            for store in &stores {
                caches.push((
                    tenant,
                    Cache::builder(TenantUsers::new(tenant, tag))
                        .store(Arc::clone(store))
                        .build()
                        .unwrap(),
                ));
            }
        }
        let loads = caches.iter().flat_map(|(tenant, cache)| {
            (0..8).map(move |_| async move {
                let got = cache.loader().load_many(1..=20).await.unwrap();
                for id in 1..=20u64 {
                    assert_eq!(got[&id], format!("{tenant}'s user {id}"), "{tag}");
                }
            })
        });
        join_all(loads).await;
    }

    // What the namespace prevents: with one namespace for both, the second
    // tenant is handed the first one's value.
    let mut globex = TenantUsers::new("globex", "shared");
    globex.namespace = TenantUsers::new("acme", "shared").namespace;
    let acme = Cache::builder(TenantUsers::new("acme", "shared"))
        .store(pg.clone())
        .build()
        .unwrap();
    let globex = Cache::builder(globex).store(pg).build().unwrap();
    acme.loader().load(1).await.unwrap();
    assert_eq!(
        globex.loader().load(1).await.unwrap().as_deref(),
        Some("acme's user 1"),
        "a namespace shared by tenants leaks"
    );
    db.cleanup().await;
}

/// A store runs its reads, claims and publishes in its lanes: 64
/// concurrent requests over 16 namespaces (which never share a statement)
/// on a pool of 8 open about as many connections as the store has lanes
/// (the lanes keep theirs between statements); every key is fetched once,
/// and each request gets its own values.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_uses_about_as_many_connections_as_it_has_lanes() {
    let db = TestDb::new("lanes").await;
    for lanes in [1usize, 3] {
        let pool = db.pool(8).await;
        let store = PgStore::builder(pool.clone())
            .table(db.table())
            .lanes(std::num::NonZeroUsize::new(lanes).unwrap())
            .build()
            .unwrap();
        assert_eq!(store.lanes().get(), lanes);
        store.migrate().await.unwrap();
        let fakes: Vec<Fake<u64>> = (0..16)
            .map(|n| {
                Fake::<u64>::builder(format!("pg/lanes/{lanes}/{n}"))
                    .delay(Duration::from_millis(20))
                    .build()
            })
            .collect();
        let barrier = Arc::new(Barrier::new(64));
        let mut requests = Vec::new();
        for fake in &fakes {
            let cache = Cache::builder(fake.clone())
                .store(store.clone())
                .build()
                .unwrap();
            for r in 0..4u64 {
                let (cache, barrier) = (cache.clone(), barrier.clone());
                let keys: Vec<u64> = (r * 10..r * 10 + 10).collect();
                requests.push(tokio::spawn(async move {
                    barrier.wait().await;
                    let got = cache.loader().load_many(keys.clone()).await.unwrap();
                    for key in &keys {
                        assert_eq!(got[key], value_of(key));
                    }
                }));
            }
        }
        for request in join_all(requests).await {
            request.unwrap();
        }
        // One more than the lanes at most: a connection the lanes gave
        // back may still be on its way into the pool (which tests it) when
        // a lane needs one, and on a loaded machine a statement may wait a
        // second for a lane and go past it. Without lanes it opens all 8.
        let opened = pool.size() as usize;
        assert!(
            opened <= lanes + 1,
            "{opened} connections opened with {lanes} lane(s)"
        );
        for fake in &fakes {
            assert_eq!(fake.keys_fetched(), 40, "each key fetched once");
        }
        // At rest, the lanes give their connections back to the pool.
        tokio::time::timeout(Duration::from_secs(10), async {
            while pool.num_idle() < pool.size() as usize {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the lanes returned their connections");
        pool.close().await;
    }
    db.cleanup().await;
}

/// A statement stuck in the store's only lane (a publish waiting for a row
/// lock an outside transaction holds) holds up the store's other
/// statements for about a second, not until the lock is released: a hit
/// then goes past the lanes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stuck_lane_holds_up_a_hit_for_about_a_second() {
    let db = TestDb::new("stucklane").await;
    let namespace = "pg/stuck-lane";
    let store = PgStore::builder(db.pool(4).await)
        .table(db.table())
        .build()
        .unwrap();
    assert_eq!(store.lanes().get(), 1);
    store.migrate().await.unwrap();
    let gate = Arc::new(Semaphore::new(1));
    let fake = Fake::<u64>::builder(namespace).gate(gate.clone()).build();
    let cache = Cache::builder(fake.clone()).store(store).build().unwrap();
    cache.loader().load(0).await.unwrap(); // key 0 is in the table

    // Key 1's fill leases its row, then waits at the provider.
    let fill = tokio::spawn({
        let cache = cache.clone();
        async move { cache.loader().load(1).await }
    });
    wait_for_calls(&fake, 2).await;
    // An outside transaction holds key 1's row: the fill's publish waits
    // for it, in the lane.
    let mut outside = PgConnection::connect(&db.url).await.unwrap();
    let mut tx = outside.begin().await.unwrap();
    let locked = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT 1 FROM {} WHERE namespace = $1 AND key = '1' FOR UPDATE",
        db.table()
    )))
    .bind(namespace)
    .execute(&mut *tx)
    .await
    .unwrap();
    assert_eq!(locked.rows_affected(), 1, "the lease row");
    gate.add_permits(1);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let asked = Instant::now();
    let hit = tokio::time::timeout(Duration::from_secs(5), cache.loader().load(0))
        .await
        .expect("the hit waited for the stuck lane")
        .unwrap();
    let took = asked.elapsed();
    assert_eq!(hit, Some(value_of(&0)));
    assert!(!fill.is_finished(), "the publish still waits for the row");
    eprintln!("a hit answered in {took:?} past a stuck lane");

    tx.rollback().await.unwrap();
    let filled = tokio::time::timeout(Duration::from_secs(30), fill)
        .await
        .expect("the fill publishes once the row is free")
        .unwrap()
        .unwrap();
    assert_eq!(filled, Some(value_of(&1)));
    assert_eq!(fake.keys_fetched(), 2);
    db.cleanup().await;
}
