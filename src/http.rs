//! [`HttpBatchProvider`]: a ready-made provider for the common JSON batch
//! API shape (feature `http`).

use std::collections::HashMap;
use std::fmt::{self, Display};
use std::hash::Hash;
use std::marker::PhantomData;
use std::time::{Duration, SystemTime};

use reqwest::header::RETRY_AFTER;
use reqwest::{Client, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{BatchFetch, Error, ErrorClass};

/// A provider for APIs shaped like
/// `GET {url}?ids=1,2,3 → {"items": [{"id": 1, …}, {"id": 2, …}]}`.
///
/// The query parameter (`ids`), the id field of each item (`id`) and the
/// path to the item array (`items`; dotted for nested objects, empty when
/// the body is the array itself) are configurable. Each item is decoded
/// whole into `V`; an id the answer does not contain is "not found". Ids are
/// matched by their text: `1` and `"1"` both answer the key `1`.
///
/// Errors are classified for the cache's retry policy:
///
/// | answer | class |
/// |---|---|
/// | 429, with `Retry-After` in seconds or as an HTTP date | [`ErrorClass::RateLimited`] |
/// | 5xx, connection errors, timeouts | [`ErrorClass::Transient`] |
/// | other 4xx, an undecodable body | [`ErrorClass::Permanent`] |
///
/// # Errors per item
///
/// An item that does not decode into `V` fails only its own key
/// ([`HttpError::Decode`]), not the call. An API that reports failures per
/// item, as `{"items": [{"id": 1, …}, {"id": 2, "error": {"status": 503,
/// "message": "shard down"}}]}`, names that field with
/// [`item_error_field`](Self::item_error_field): an item whose field is
/// present and not `null` fails only its key with [`HttpError::Item`]. The
/// field may be an object with an optional numeric `status` (or `code`) and
/// a `message`, or a string (the message). By its status, the key is:
///
/// | item error | key |
/// |---|---|
/// | status 404 | not found (`Ok(None)`, cached as a negative entry) |
/// | status 429 | [`ErrorClass::RateLimited`]: asked again |
/// | status 5xx | [`ErrorClass::Transient`]: asked again |
/// | any other, or none | [`ErrorClass::Permanent`]: fails at once |
///
/// Keys asked again are asked alone (with the other failed keys of the
/// call) within the cache's retry policy; see
/// [`BatchFetch::fetch_each`].
///
/// ```no_run
/// # fn run() -> Result<(), loadlock::Error> {
/// use loadlock::{Cache, HttpBatchProvider};
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct User { id: u64, name: String }
///
/// let users = HttpBatchProvider::<u64, User>::new(
///     reqwest::Client::new(),
///     "http://users.internal/v1/users",
///     "users/v1",
/// )?
/// .ids_param("id")
/// .items_path("data.users")
/// .max_batch_size(50);
/// let cache = Cache::builder(users).build()?;
/// # Ok(()) }
/// ```
///
/// No TLS is compiled in by default: enable reqwest's `rustls` feature in
/// your own `Cargo.toml` to call `https` URLs.
pub struct HttpBatchProvider<K, V> {
    client: Client,
    url: Url,
    namespace: String,
    ids_param: String,
    id_field: String,
    items_path: Vec<String>,
    item_error_field: Option<String>,
    max_batch_size: usize,
    parse_key: Option<fn(&str) -> Option<K>>,
    _types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> fmt::Debug for HttpBatchProvider<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpBatchProvider")
            .field("url", &self.url.as_str())
            .field("namespace", &self.namespace)
            .field("ids_param", &self.ids_param)
            .field("id_field", &self.id_field)
            .field("items_path", &self.items_path)
            .field("item_error_field", &self.item_error_field)
            .field("max_batch_size", &self.max_batch_size)
            .field("parses_keys", &self.parse_key.is_some())
            .finish_non_exhaustive()
    }
}

impl<K, V> HttpBatchProvider<K, V> {
    /// A provider calling `url` with `client`, its entries under
    /// `namespace`. Defaults: parameter `ids`, id field `id`, items at
    /// `items`, 100 ids per call.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] when `url` does not parse.
    pub fn new(client: Client, url: &str, namespace: impl Into<String>) -> Result<Self, Error> {
        let url =
            Url::parse(url).map_err(|e| Error::config(format!("provider url {url:?}: {e}")))?;
        Ok(HttpBatchProvider {
            client,
            url,
            namespace: namespace.into(),
            ids_param: "ids".into(),
            id_field: "id".into(),
            items_path: vec!["items".into()],
            item_error_field: None,
            max_batch_size: 100,
            parse_key: None,
            _types: PhantomData,
        })
    }

    /// The query parameter carrying the comma-separated ids.
    #[must_use]
    pub fn ids_param(mut self, name: impl Into<String>) -> Self {
        self.ids_param = name.into();
        self
    }

    /// The field of each item holding its id.
    #[must_use]
    pub fn id_field(mut self, name: impl Into<String>) -> Self {
        self.id_field = name.into();
        self
    }

    /// Where the item array is in the body: dotted object keys
    /// (`"data.items"`), or `""` when the body is the array.
    #[must_use]
    pub fn items_path(mut self, path: &str) -> Self {
        self.items_path = path
            .split('.')
            .filter(|part| !part.is_empty())
            .map(str::to_owned)
            .collect();
        self
    }

    /// The field of an item that, when present and not `null`, reports that
    /// the API failed this item alone (see [Errors per
    /// item](HttpBatchProvider#errors-per-item)). None by default: every
    /// item is a value.
    #[must_use]
    pub fn item_error_field(mut self, name: impl Into<String>) -> Self {
        self.item_error_field = Some(name.into());
        self
    }

    /// The most ids per request (the API's limit). Zero is rejected when the
    /// cache is built.
    #[must_use]
    pub fn max_batch_size(mut self, max: usize) -> Self {
        self.max_batch_size = max;
        self
    }

    /// How to tell a key from its text: lets calls waiting for a fleet
    /// budget carry keys other instances missed (see
    /// [`BatchFetch::parse_key`]). For most key types,
    /// `.parse_keys(|text| text.parse().ok())`. Not set by default.
    #[must_use]
    pub fn parse_keys(mut self, parse: fn(&str) -> Option<K>) -> Self {
        self.parse_key = Some(parse);
        self
    }
}

/// Why an [`HttpBatchProvider`] call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum HttpError {
    /// 429 Too Many Requests, with the delay from `Retry-After` if it had a
    /// valid one.
    RateLimited {
        /// How long the API asked to wait.
        retry_after: Option<Duration>,
    },
    /// Any other non-success status.
    Status {
        /// The status.
        status: StatusCode,
        /// The start of the body, for the log.
        body: String,
    },
    /// The request did not complete: connection refused or reset, timeout.
    Transport(reqwest::Error),
    /// The body was not the expected JSON (for a whole call), or an item
    /// did not decode into the value type (for that item's key).
    Decode(String),
    /// The API failed this item alone (see [Errors per
    /// item](HttpBatchProvider#errors-per-item)).
    Item {
        /// The item's id, as the API wrote it.
        id: String,
        /// The status the API gave the item, if any.
        status: Option<u16>,
        /// What the API said.
        message: String,
    },
}

impl Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::RateLimited {
                retry_after: Some(after),
            } => write!(f, "rate limited (429), retry after {after:?}"),
            HttpError::RateLimited { retry_after: None } => f.write_str("rate limited (429)"),
            HttpError::Status { status, body } => write!(f, "HTTP {status}: {body}"),
            HttpError::Transport(err) => write!(f, "request failed: {err}"),
            HttpError::Decode(why) => write!(f, "undecodable answer: {why}"),
            HttpError::Item {
                id,
                status: Some(status),
                message,
            } => write!(f, "item {id} failed ({status}): {message}"),
            HttpError::Item {
                id,
                status: None,
                message,
            } => write!(f, "item {id} failed: {message}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Transport(err) => Some(err),
            _ => None,
        }
    }
}

/// Parses `Retry-After`: delta-seconds (`"120"`) or an HTTP date (`"Wed, 21
/// Oct 2015 07:28:00 GMT"`, counted from `now`; a past date is zero).
pub(crate) fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// An item's error field as an [`HttpError::Item`].
fn item_error(id: &str, error: &serde_json::Value) -> HttpError {
    let (status, message) = match error {
        serde_json::Value::Object(fields) => {
            let status = ["status", "code"]
                .iter()
                .find_map(|name| fields.get(*name).and_then(serde_json::Value::as_u64))
                .and_then(|status| u16::try_from(status).ok());
            let message = fields
                .get("message")
                .and_then(serde_json::Value::as_str)
                .map_or_else(|| error.to_string(), str::to_owned);
            (status, message)
        }
        serde_json::Value::String(message) => (None, message.clone()),
        other => (None, other.to_string()),
    };
    HttpError::Item {
        id: id.to_owned(),
        status,
        message,
    }
}

/// The text an id is matched by.
fn id_text(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[async_trait::async_trait]
impl<K, V> BatchFetch for HttpBatchProvider<K, V>
where
    K: Eq + Hash + Clone + Display + Send + Sync + 'static,
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    type Key = K;
    type Value = V;
    type Error = HttpError;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// A key whose text contains a comma (the separator of the ids in the
    /// request) is refused: only its own loads fail.
    fn check_key(&self, key: &K) -> Result<(), String> {
        if crate::store::displays_char(key, ',') {
            Err("it contains a comma, which separates ids in the request".into())
        } else {
            Ok(())
        }
    }

    fn parse_key(&self, text: &str) -> Option<K> {
        self.parse_key.and_then(|parse| parse(text))
    }

    async fn fetch(&self, keys: &[K]) -> Result<HashMap<K, V>, HttpError> {
        self.fetch_each(keys)
            .await?
            .into_iter()
            .map(|(key, answer)| answer.map(|value| (key, value)))
            .collect()
    }

    async fn fetch_each(&self, keys: &[K]) -> Result<HashMap<K, Result<V, HttpError>>, HttpError> {
        let by_text: HashMap<String, &K> = keys.iter().map(|k| (k.to_string(), k)).collect();
        if let Some(bad) = by_text.keys().find(|text| text.contains(',')) {
            return Err(HttpError::Decode(format!(
                "key {bad:?} contains a comma, which separates ids in the request"
            )));
        }
        let ids = keys
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let mut url = self.url.clone();
        url.query_pairs_mut().append_pair(&self.ids_param, &ids);

        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(HttpError::Transport)?;
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            return Err(HttpError::RateLimited { retry_after });
        }
        let body = response.bytes().await.map_err(HttpError::Transport)?;
        if !status.is_success() {
            let body = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return Err(HttpError::Status { status, body });
        }

        let mut document: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| HttpError::Decode(e.to_string()))?;
        let mut items = &mut document;
        for part in &self.items_path {
            items = items
                .get_mut(part)
                .ok_or_else(|| HttpError::Decode(format!("no `{part}` in the answer")))?;
        }
        let serde_json::Value::Array(items) = items.take() else {
            return Err(HttpError::Decode("the items are not an array".into()));
        };
        let mut found = HashMap::with_capacity(items.len());
        for item in items {
            // An item without a usable id means the id field is wrong: every
            // key would look "not found" and be cached so. Fail instead.
            let id = item.get(&self.id_field).and_then(id_text).ok_or_else(|| {
                HttpError::Decode(format!(
                    "an item has no string or number `{}`",
                    self.id_field
                ))
            })?;
            let Some(key) = by_text.get(&id).copied() else {
                continue; // not asked for
            };
            let failure = self
                .item_error_field
                .as_deref()
                .and_then(|field| item.get(field))
                .filter(|error| !error.is_null())
                .map(|error| item_error(&id, error));
            let answer = match failure {
                // The API says it has no such item: not found.
                Some(HttpError::Item {
                    status: Some(404), ..
                }) => continue,
                Some(failure) => Err(failure),
                None => serde_json::from_value(item)
                    .map_err(|e| HttpError::Decode(format!("item {key}: {e}"))),
            };
            found.insert(key.clone(), answer);
        }
        Ok(found)
    }

    fn classify(&self, error: &HttpError) -> ErrorClass {
        match error {
            HttpError::RateLimited { retry_after } => ErrorClass::RateLimited {
                retry_after: *retry_after,
            },
            HttpError::Status { status, .. } if status.is_server_error() => ErrorClass::Transient,
            HttpError::Item {
                status: Some(429), ..
            } => ErrorClass::RateLimited { retry_after: None },
            HttpError::Item {
                status: Some(500..=599),
                ..
            } => ErrorClass::Transient,
            HttpError::Transport(err) if !err.is_builder() => ErrorClass::Transient,
            _ => ErrorClass::Permanent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_both_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after(" 120 ", now),
            Some(Duration::from_secs(120))
        );
        // 1445412480 is Wed, 21 Oct 2015 07:28:00 GMT.
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:05 GMT", now),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
