//! What a new application writes, with these two lines in its manifest:
//!
//! ```toml
//! loadlock = "0.1"
//! sqlx = { version = "0.9", features = ["postgres", "runtime-tokio"] }
//! ```
//!
//! Its own sqlx builds the pool `PgStore::new` takes; `PgStore::connect`
//! needs no sqlx at all; the invalidation stream is read without pinning;
//! loads run against a real Postgres.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use futures::StreamExt;
use loadlock::{BatchFetch, Cache, Error, Invalidation, MemoryStore, PgStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use support::pg::TestDb;

struct Users;

#[async_trait::async_trait]
impl BatchFetch for Users {
    type Key = u64;
    type Value = String;
    type Error = Infallible;

    fn namespace(&self) -> &str {
        "fresh/users"
    }

    async fn fetch(&self, ids: &[u64]) -> Result<HashMap<u64, String>, Infallible> {
        Ok(ids.iter().map(|&id| (id, format!("user {id}"))).collect())
    }
}

/// The application's own connection options, with the test's schema first
/// on the search path (where `PgStore::new`'s default table then goes).
fn options(db: &TestDb) -> PgConnectOptions {
    db.url
        .parse::<PgConnectOptions>()
        .unwrap()
        .options([("search_path", db.schema.as_str())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_on_sqlx_0_9_hands_its_pool_to_the_store() {
    let db = TestDb::new("fresh_app").await;
    let pool: sqlx::PgPool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options(&db))
        .await
        .unwrap();
    let store = PgStore::new(pool);
    store.migrate().await.unwrap();
    let cache = Cache::builder(Users).store(store).build().unwrap();

    // No pinning: the stream is `Unpin`.
    let mut events = cache.invalidations();
    assert_eq!(
        cache.loader().load(7).await.unwrap().as_deref(),
        Some("user 7")
    );
    cache.invalidate([7]).await.unwrap();
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(Invalidation::Keys(keys)) => return keys,
                // The listener says so once it listens: nothing to do here.
                Some(Invalidation::Missed) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    })
    .await
    .expect("the invalidation arrives");
    assert_eq!(heard, vec!["7".to_owned()]);

    // A bounded in-process store, for the tier that needs no Postgres.
    let local = Cache::builder(Users)
        .store(MemoryStore::with_capacity(1_000))
        .build()
        .unwrap();
    assert_eq!(
        local.loader().load(1).await.unwrap().as_deref(),
        Some("user 1")
    );
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_needs_no_sqlx_and_says_what_is_wrong() {
    let db = TestDb::new("fresh_connect").await;
    // `options` in the URL: the test's schema first on the search path.
    let separator = if db.url.contains('?') { '&' } else { '?' };
    let url = format!(
        "{}{separator}options=-c%20search_path%3D{}",
        db.url, db.schema
    );
    let store = PgStore::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let cache = Cache::builder(Users).store(store).build().unwrap();
    assert_eq!(cache.loader().load_many([1, 2]).await.unwrap().len(), 2);
    let budget = loadlock::PgRateLimit::connect(
        &url,
        loadlock::Quota::per_second(std::num::NonZeroU32::new(10).unwrap()),
    )
    .await
    .unwrap();
    budget.migrate().await.unwrap();

    let err = PgStore::connect("mysql://localhost/app").await.unwrap_err();
    assert!(matches!(err, Error::Config(_)), "{err}");
    // Nothing listens on port 1.
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        PgStore::connect("postgres://loadlock@127.0.0.1:1/app"),
    )
    .await
    .expect("fails, does not hang")
    .unwrap_err();
    assert!(matches!(err, Error::Store { .. }), "{err}");
    assert!(err.to_string().contains("connecting to Postgres"), "{err}");
    db.cleanup().await;
}
