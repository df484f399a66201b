//! An axum service that builds a loader per request, through an extractor.
//!
//! `GET /users/{id}` loads one user; `GET /feed` loads 50 users per request
//! (with repeats, as a real feed has); `GET /stats` shows what each tier
//! answered; `GET /metrics` is the cache's `metrics` counters and histograms
//! for Prometheus. The provider is the crate's `HttpBatchProvider`, pointed at a
//! small simulated upstream (`GET /upstream/users?ids=…`) served by the same
//! process. Entries are kept in a `MemoryStore`, or in Postgres when
//! `DATABASE_URL` is set.
//!
//! ```text
//! cargo run --example axum_per_request --features http,metrics
//! cargo run --example axum_per_request --features http,metrics -- --demo   # makes a few requests itself, then exits
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::{FromRef, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use loadlock::{Cache, HttpBatchProvider, Loader, PgStore};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct User {
    id: u64,
    name: String,
    followers: u64,
}

type Users = HttpBatchProvider<u64, User>;

#[derive(Clone)]
struct AppState {
    users: Cache<Users>,
    upstream_calls: Arc<AtomicU64>,
    prometheus: PrometheusHandle,
}

impl FromRef<AppState> for Cache<Users> {
    fn from_ref(state: &AppState) -> Self {
        state.users.clone()
    }
}

/// The extractor: a fresh loader for every request, from the shared cache.
struct RequestLoader(Loader<Users>);

impl<S> FromRequestParts<S> for RequestLoader
where
    Cache<Users>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(_: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Ok(RequestLoader(Cache::<Users>::from_ref(state).loader()))
    }
}

/// Load errors become 502 (the upstream failed) or 503 (the cache did).
struct AppError(loadlock::Error);

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = if self.0.is_provider() {
            StatusCode::BAD_GATEWAY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, self.0.to_string()).into_response()
    }
}

impl From<loadlock::Error> for AppError {
    fn from(err: loadlock::Error) -> Self {
        AppError(err)
    }
}

async fn user(
    RequestLoader(users): RequestLoader,
    Path(id): Path<u64>,
) -> Result<Response, AppError> {
    Ok(match users.load(id).await? {
        Some(user) => Json(user).into_response(),
        None => (StatusCode::NOT_FOUND, "no such user").into_response(),
    })
}

#[derive(Deserialize)]
struct FeedQuery {
    #[serde(default)]
    page: u64,
}

/// 50 posts' authors; popular authors repeat, so the memo answers many.
async fn feed(
    RequestLoader(users): RequestLoader,
    Query(q): Query<FeedQuery>,
) -> Result<Json<Vec<User>>, AppError> {
    let authors: Vec<u64> = (0..50u64).map(|i| (q.page * 7 + i * i) % 40 + 1).collect();
    // Each post resolves its author on its own, as nested code does; the
    // loader batches them into one upstream call.
    let loads = authors.iter().map(|&id| users.load(id));
    let found = futures::future::try_join_all(loads).await?;
    Ok(Json(found.into_iter().flatten().collect()))
}

async fn stats(State(state): State<AppState>) -> Json<serde_json::Value> {
    let s = state.users.stats();
    Json(serde_json::json!({
        "loads": s.loads,
        "memo_hits": s.memo_hits,
        "coalesced": s.coalesced,
        "store_hits": s.store_hits,
        "provider_calls": s.provider_calls,
        "provider_keys": s.provider_keys,
        "hit_ratio": s.hit_ratio(),
        "upstream_requests": state.upstream_calls.load(Ordering::Relaxed),
    }))
}

/// Every `loadlock_*` metric, in Prometheus' text format.
async fn metrics(State(state): State<AppState>) -> String {
    state.prometheus.render()
}

#[derive(Deserialize)]
struct UpstreamQuery {
    ids: String,
}

/// The simulated upstream API: users 1..=1000 exist.
async fn upstream(
    State(state): State<AppState>,
    Query(q): Query<UpstreamQuery>,
) -> Json<serde_json::Value> {
    state.upstream_calls.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let items: Vec<User> = q
        .ids
        .split(',')
        .filter_map(|id| id.parse::<u64>().ok())
        .filter(|&id| (1..=1000).contains(&id))
        .map(|id| User {
            id,
            name: format!("user {id}"),
            followers: id * 37 % 1000,
        })
        .collect();
    Json(serde_json::json!({ "items": items }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let demo = std::env::args().any(|a| a == "--demo");
    // Installed before the cache is built: its counters register then.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);

    let provider = Users::new(
        reqwest::Client::new(),
        &format!("{base}/upstream/users"),
        "users/v1",
    )?
    .max_batch_size(100);
    let mut builder = Cache::builder(provider);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        let store = PgStore::new(sqlx::PgPool::connect(&url).await?);
        store.migrate().await?;
        builder = builder.store(store);
    }
    let state = AppState {
        users: builder.build()?,
        upstream_calls: Arc::new(AtomicU64::new(0)),
        prometheus,
    };

    let app = Router::new()
        .route("/users/{id}", get(user))
        .route("/feed", get(feed))
        .route("/stats", get(stats))
        .route("/metrics", get(metrics))
        .route("/upstream/users", get(upstream))
        .with_state(state);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    println!("listening on {base}; try:");
    println!("  curl {base}/users/7");
    println!("  curl {base}/users/5000        # 404: the upstream has no such user");
    println!("  curl '{base}/feed?page=3'");
    println!("  curl {base}/stats");
    println!("  curl {base}/metrics");

    if demo {
        let client = reqwest::Client::new();
        let get = |path: String| {
            let client = client.clone();
            async move {
                let response = client.get(path).send().await?;
                let status = response.status();
                Ok::<_, reqwest::Error>((status, response.text().await?))
            }
        };
        let (status, body) = get(format!("{base}/users/7")).await?;
        println!("\nGET /users/7 -> {status} {body}");
        let (status, _) = get(format!("{base}/users/5000")).await?;
        println!("GET /users/5000 -> {status}");
        // 20 feed requests at once: 1,000 author loads.
        let feeds = (0..20).map(|page| get(format!("{base}/feed?page={page}")));
        for result in futures::future::join_all(feeds).await {
            let (status, body) = result?;
            let users: Vec<User> = serde_json::from_str(&body).unwrap_or_default();
            assert!(status.is_success() && users.len() == 50, "{status} {body}");
        }
        let (_, body) = get(format!("{base}/stats")).await?;
        println!("after 20 concurrent feeds of 50 users: {body}");
        let (_, body) = get(format!("{base}/metrics")).await?;
        let ours: Vec<&str> = body
            .lines()
            .filter(|line| line.starts_with("loadlock_") && !line.contains("_bucket"))
            .collect();
        assert!(
            ours.iter().any(|l| l.starts_with("loadlock_loads_total")),
            "{body}"
        );
        println!("GET /metrics ->\n{}", ours.join("\n"));
        return Ok(());
    }
    server.await??;
    Ok(())
}
