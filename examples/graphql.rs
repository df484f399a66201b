//! An async-graphql schema whose resolvers load through loadlock: the N+1
//! problem solved inside one request (one batched provider call for all
//! authors of a page), across requests, and across instances (two caches
//! sharing one store; Postgres when `DATABASE_URL` is set, else a shared
//! `MemoryStore` standing in for it).
//!
//! ```text
//! cargo run --example graphql
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_graphql::{Context, EmptyMutation, EmptySubscription, Object, Schema, SimpleObject};
use loadlock::{BatchFetch, Cache, Loader, MemoryStore, PgStore, Store};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize, SimpleObject)]
struct Author {
    id: u64,
    name: String,
}

/// The slow upstream: one call per batch, counted.
#[derive(Clone)]
struct Authors {
    calls: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl BatchFetch for Authors {
    type Key = u64;
    type Value = Author;
    type Error = std::convert::Infallible;

    fn namespace(&self) -> &str {
        "graphql/authors/v1"
    }

    async fn fetch(&self, ids: &[u64]) -> Result<HashMap<u64, Author>, Self::Error> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(20)).await;
        Ok(ids
            .iter()
            .map(|&id| {
                (
                    id,
                    Author {
                        id,
                        name: format!("author {id}"),
                    },
                )
            })
            .collect())
    }
}

struct Post {
    id: u64,
    author_id: u64,
}

#[Object]
impl Post {
    async fn id(&self) -> u64 {
        self.id
    }

    async fn title(&self) -> String {
        format!("post {}", self.id)
    }

    /// Resolved per post, batched by the request's loader.
    async fn author(&self, ctx: &Context<'_>) -> async_graphql::Result<Option<Author>> {
        let loader = ctx.data::<Loader<Authors>>()?;
        Ok(loader.load(self.author_id).await?)
    }
}

struct Query;

#[Object]
impl Query {
    /// A page of posts; 12 authors write them all.
    async fn posts(&self, page: u64, size: u64) -> Vec<Post> {
        (page * size..(page + 1) * size)
            .map(|id| Post {
                id,
                author_id: id * 5 % 12 + 1,
            })
            .collect()
    }
}

type AppSchema = Schema<Query, EmptyMutation, EmptySubscription>;

/// One request: a fresh loader in the request's data.
async fn execute(
    schema: &AppSchema,
    cache: &Cache<Authors>,
    query: &str,
) -> async_graphql::Response {
    schema
        .execute(async_graphql::Request::new(query).data(cache.loader()))
        .await
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls = Arc::new(AtomicU64::new(0));
    let provider = Authors {
        calls: calls.clone(),
    };
    // The store both instances share.
    let store: Arc<dyn Store<Authors>> = match std::env::var("DATABASE_URL") {
        Ok(url) => {
            let store = PgStore::new(sqlx::PgPool::connect(&url).await?);
            store.migrate().await?;
            Arc::new(store)
        }
        Err(_) => Arc::new(MemoryStore::new()),
    };
    let instance_a = Cache::builder(provider.clone())
        .store(store.clone())
        .build()?;
    let instance_b = Cache::builder(provider).store(store).build()?;
    let schema = Schema::new(Query, EmptyMutation, EmptySubscription);

    let query = "{ posts(page: 0, size: 30) { id title author { name } } }";
    let first = execute(&schema, &instance_a, query).await;
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    println!(
        "request 1 on instance A: 30 posts, 12 distinct authors -> {} provider call(s)",
        calls.load(Ordering::Relaxed)
    );

    let second = execute(&schema, &instance_a, query).await;
    assert!(second.errors.is_empty());
    println!(
        "request 2 on instance A: {} provider call(s) so far (the store answered)",
        calls.load(Ordering::Relaxed)
    );

    let third = execute(&schema, &instance_b, query).await;
    assert!(third.errors.is_empty());
    println!(
        "request 3 on instance B: {} provider call(s) so far (shared store)",
        calls.load(Ordering::Relaxed)
    );

    // Ten concurrent requests for other pages, split over both instances.
    let pages = (1..=10u64).map(|page| {
        let (schema, cache) = (
            schema.clone(),
            if page % 2 == 0 {
                instance_a.clone()
            } else {
                instance_b.clone()
            },
        );
        async move {
            let query = format!("{{ posts(page: {page}, size: 30) {{ author {{ name }} }} }}");
            execute(&schema, &cache, &query).await
        }
    });
    for response in futures::future::join_all(pages).await {
        assert!(response.errors.is_empty(), "{:?}", response.errors);
    }
    println!(
        "10 more concurrent requests over both instances: {} provider call(s) in all",
        calls.load(Ordering::Relaxed)
    );
    let json = serde_json::to_value(&first.data)?;
    println!("\nfirst post of request 1: {}", json["posts"][0]);
    Ok(())
}
