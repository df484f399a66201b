//! Your own `BatchFetch` over reqwest, for an API of another shape than
//! `HttpBatchProvider` covers: `POST /v2/prices` with a JSON body
//! `{"skus": [...]}`, answering `{"prices": {"sku": {...} | null}}`, and
//! throttling with 429 + `Retry-After`.
//!
//! A small simulated upstream runs in the same process (it throttles the
//! first request), so the example runs anywhere:
//!
//! ```text
//! cargo run --example http_provider --features http
//! ```

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use loadlock::{BatchFetch, Cache, ErrorClass, Quota, RetryPolicy};
use serde::{Deserialize, Serialize};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Price {
    cents: u64,
    currency: String,
}

/// The user's provider: one POST per batch.
struct PriceApi {
    client: reqwest::Client,
    base: String,
}

#[derive(Debug, thiserror::Error)]
enum PriceError {
    #[error("throttled, retry after {0:?}")]
    Throttled(Option<Duration>),
    #[error("price API answered {0}")]
    Status(reqwest::StatusCode),
    #[error(transparent)]
    Http(#[from] reqwest::Error),
}

#[derive(Deserialize)]
struct PriceAnswer {
    prices: HashMap<String, Option<Price>>,
}

#[async_trait::async_trait]
impl BatchFetch for PriceApi {
    type Key = String;
    type Value = Price;
    type Error = PriceError;

    fn namespace(&self) -> &str {
        "prices/v2"
    }

    fn max_batch_size(&self) -> usize {
        25
    }

    async fn fetch(&self, skus: &[String]) -> Result<HashMap<String, Price>, PriceError> {
        let response = self
            .client
            .post(format!("{}/v2/prices", self.base))
            .json(&serde_json::json!({ "skus": skus }))
            .send()
            .await?;
        match response.status() {
            reqwest::StatusCode::TOO_MANY_REQUESTS => {
                let after = response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .map(Duration::from_secs);
                return Err(PriceError::Throttled(after));
            }
            status if !status.is_success() => return Err(PriceError::Status(status)),
            _ => {}
        }
        let answer: PriceAnswer = response.json().await?;
        // `null` means the API has no such SKU: leave it out ("not found").
        Ok(answer
            .prices
            .into_iter()
            .filter_map(|(sku, price)| Some((sku, price?)))
            .collect())
    }

    fn classify(&self, error: &PriceError) -> ErrorClass {
        match error {
            PriceError::Throttled(after) => ErrorClass::RateLimited {
                retry_after: *after,
            },
            PriceError::Status(status) if status.is_server_error() => ErrorClass::Transient,
            PriceError::Http(_) => ErrorClass::Transient,
            PriceError::Status(_) => ErrorClass::Permanent,
        }
    }
}

/// The simulated upstream: throttles its first request for one second, then
/// prices every SKU except those starting with "gone".
struct Upstream {
    first: std::sync::atomic::AtomicBool,
}

impl Respond for Upstream {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        if self.first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return ResponseTemplate::new(429).insert_header("Retry-After", "1");
        }
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap_or_default();
        let prices: serde_json::Map<String, serde_json::Value> = body["skus"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|sku| sku.as_str())
            .map(|sku| {
                let price = if sku.starts_with("gone") {
                    serde_json::Value::Null
                } else {
                    serde_json::json!({ "cents": 100 + sku.len() as u64, "currency": "EUR" })
                };
                (sku.to_owned(), price)
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "prices": prices }))
    }
}

#[tokio::main]
async fn main() -> Result<(), loadlock::Error> {
    let upstream = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/v2/prices"))
        .respond_with(Upstream { first: true.into() })
        .mount(&upstream)
        .await;

    let cache = Cache::builder(PriceApi {
        client: reqwest::Client::new(),
        base: upstream.uri(),
    })
    // The provider allows 5 calls per second; stay just under it.
    .rate_limit_calls(
        Quota::per_period(NonZeroU32::new(5).unwrap(), Duration::from_millis(1050)).unwrap(),
    )
    .retry(RetryPolicy::default().with_max_retry_after(Duration::from_secs(5)))
    .provider_timeout(Duration::from_secs(2))
    .build()?;

    let started = Instant::now();
    let skus: Vec<String> = (0..60)
        .map(|i| {
            if i % 20 == 0 {
                format!("gone-{i}")
            } else {
                format!("sku-{i}")
            }
        })
        .collect();
    let prices = cache.loader().load_many(skus.clone()).await?;
    println!(
        "{} of {} SKUs priced in {:.1} s (the first call was throttled for 1 s)",
        prices.len(),
        skus.len(),
        started.elapsed().as_secs_f64()
    );
    println!("sku-1 costs {:?}", prices.get("sku-1"));

    let again = cache.loader().load_many(skus).await?;
    assert_eq!(again.len(), prices.len());

    let s = cache.stats();
    println!(
        "provider calls {} ({} retried), rate-limit waits {}, store hits on the second pass {}",
        s.provider_calls, s.provider_retries, s.rate_limited_waits, s.store_hits
    );
    Ok(())
}
