//! The published conformance suite (`loadlock::testing`), run against both
//! stores of the crate, the way a third-party store runs it.

mod support;

use std::time::Duration;

use loadlock::{testing, LockMode, MemoryStore};
use support::pg::TestDb;

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    testing::$name(MemoryStore::new(), concat!("mem/", stringify!($name))).await;
                }
            )*
        }
        mod postgres {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let db = TestDb::new(stringify!($name)).await;
                    let store = db.store(LockMode::PerKey).await;
                    testing::$name(store, concat!("pg/", stringify!($name))).await;
                    db.cleanup().await;
                }
            )*
        }
    };
}

both_stores!(
    fill_then_hit,
    negative_entries,
    exactly_once_between_instances,
    failure_caches_nothing,
    namespaces_are_isolated,
    odd_keys_round_trip,
    invalidation_binds_later_loads,
);

#[tokio::test(start_paused = true)]
async fn memory_entries_expire() {
    testing::entries_expire(
        MemoryStore::new(),
        "mem/ttl",
        Duration::from_secs(30),
        |d| async move { tokio::time::advance(d + Duration::from_millis(1)).await },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_entries_expire() {
    let db = TestDb::new("expire").await;
    let store = db.store(LockMode::PerKey).await;
    // Expiry is computed by the database clock: real time passes here.
    testing::entries_expire(store, "pg/expire", Duration::from_secs(2), |d| async move {
        tokio::time::sleep(d + Duration::from_millis(50)).await
    })
    .await;
    db.cleanup().await;
}

/// Exactly-once holds in namespace mode too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_exactly_once_in_namespace_mode() {
    let db = TestDb::new("once_ns").await;
    let store = db.store(LockMode::Namespace).await;
    testing::exactly_once_between_instances(store, "pg/once_ns").await;
    db.cleanup().await;
}

/// The whole suite in one call, as a third-party store would run it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_store_runs_every_check() {
    testing::check_store(MemoryStore::new(), "mem/all").await;
}
