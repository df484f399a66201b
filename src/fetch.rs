//! The provider trait: how loadlock asks the external source for values.

use std::collections::HashMap;
use std::fmt::Display;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A provider that can fetch many keys in one call: the slow, rate-limited
/// external source behind the cache (tier 3).
///
/// Implement it once per kind of resource. loadlock guarantees that:
///
/// * `fetch` receives each key at most once per call, deduplicated, in the
///   order the keys were first asked for;
/// * a call never holds more than [`max_batch_size`](BatchFetch::max_batch_size)
///   keys (larger sets are split into several calls);
/// * a key is only passed to `fetch` when no fresh value (or fresh negative
///   entry) exists in the cache, and no other load of it is under way in this
///   process (and, with a shared store, in the fleet).
///
/// A key absent from the returned map means "the provider has no such
/// resource": the load returns `Ok(None)` and a negative entry is cached for
/// the cache's negative TTL. Keys in the map that were not asked for are
/// ignored.
///
/// If `fetch` returns an error or panics, every load waiting on that call
/// fails with [`Error::Provider`](crate::Error::Provider) /
/// [`Error::ProviderPanicked`](crate::Error::ProviderPanicked) and nothing of
/// the call is cached.
///
/// # One answer per (namespace, key), for everyone
///
/// The cache hands the answer for a key to every caller that loads it, in
/// every request and on every instance sharing the store. So the answer may
/// depend on nothing but the namespace and the key. A provider whose answer
/// depends on the caller (a bearer token, a tenant, a locale, a permission)
/// would leak one caller's data to another. Put everything the answer
/// depends on into the namespace (one provider, and one [`Cache`], per
/// tenant: `format!("users/v1/{tenant}")`) or into the key (a key type
/// `(TenantId, UserId)` that displays both), and check permissions after
/// the load, not inside `fetch`.
///
/// The trait is object-safe: `Arc<dyn BatchFetch<Key = K, Value = V, Error = E>>`
/// is itself a provider.
///
/// [`Cache`]: crate::Cache
///
/// ```
/// use std::collections::HashMap;
/// use loadlock::BatchFetch;
///
/// #[derive(Clone, serde::Serialize, serde::Deserialize)]
/// struct User { id: u64, name: String }
///
/// struct Users;
///
/// #[async_trait::async_trait]
/// impl BatchFetch for Users {
///     type Key = u64;
///     type Value = User;
///     type Error = std::io::Error;
///
///     fn namespace(&self) -> &str { "users/v1" }
///     fn max_batch_size(&self) -> usize { 100 }
///
///     async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, User>, std::io::Error> {
///         // One request to the upstream API for all `keys`.
///         Ok(keys.iter().map(|&id| (id, User { id, name: format!("user {id}") })).collect())
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait BatchFetch: Send + Sync + 'static {
    /// The key type. Its [`Display`] form identifies the key in a shared store
    /// (the `key` column of the Postgres table), so two keys must not display
    /// the same.
    type Key: Eq + Hash + Clone + Display + Send + Sync + 'static;

    /// The value type. It is serialized (JSON) when a shared store keeps it.
    type Value: Serialize + DeserializeOwned + Clone + Send + Sync + 'static;

    /// The provider's own error type; kept as the `source` of
    /// [`Error::Provider`](crate::Error::Provider).
    type Error: std::error::Error + Send + Sync + 'static;

    /// The namespace of this provider's entries: stored rows and locks are
    /// scoped by it. Change it (`"users/v2"`) when the value's shape changes
    /// incompatibly.
    fn namespace(&self) -> &str;

    /// The most keys one `fetch` call may receive. Must be at least 1; a zero
    /// is rejected by [`CacheBuilder::build`](crate::CacheBuilder::build).
    /// Defaults to 100.
    fn max_batch_size(&self) -> usize {
        100
    }

    /// Fetches `keys` from the external source.
    async fn fetch(
        &self,
        keys: &[Self::Key],
    ) -> Result<HashMap<Self::Key, Self::Value>, Self::Error>;

    /// Fetches `keys`, answering each key on its own: `Ok(value)`, or
    /// `Err` for a key the provider failed alone (one bad id in a batch)
    /// while the others of the call succeed. A key absent from the map is
    /// not found, as with [`fetch`](Self::fetch); an `Err` of the whole call
    /// fails every key of it.
    ///
    /// The cache calls this method. The default calls `fetch` and answers
    /// every key it returned with `Ok`: override it for a provider whose
    /// batch answers carry errors per item.
    ///
    /// A failed key's loads fail with
    /// [`Error::Provider`](crate::Error::Provider), its error as the
    /// source; the other keys are answered and cached, and nothing is cached
    /// for the failed one, so its next load asks again. Its error is
    /// classified with [`classify`](Self::classify): a
    /// [`Transient`](ErrorClass::Transient) or
    /// [`RateLimited`](ErrorClass::RateLimited) key is asked again (the
    /// failed keys of a call together, in one call) after the policy's
    /// backoff or its `retry_after`, within the policy's
    /// [`max_attempts`](crate::RetryPolicy::with_max_attempts), without
    /// pausing the fleet; a [`Permanent`](ErrorClass::Permanent) one fails
    /// at once.
    async fn fetch_each(
        &self,
        keys: &[Self::Key],
    ) -> Result<HashMap<Self::Key, Result<Self::Value, Self::Error>>, Self::Error> {
        Ok(self
            .fetch(keys)
            .await?
            .into_iter()
            .map(|(key, value)| (key, Ok(value)))
            .collect())
    }

    /// Says how the cache should treat an error of `fetch`: wait and retry
    /// ([`ErrorClass::RateLimited`]), retry with backoff
    /// ([`ErrorClass::Transient`]), or fail at once
    /// ([`ErrorClass::Permanent`]). Retries are bounded by the cache's
    /// [`RetryPolicy`](crate::RetryPolicy).
    ///
    /// The default treats every error as permanent: override it to let the
    /// cache recover from throttling and blips by itself.
    fn classify(&self, error: &Self::Error) -> ErrorClass {
        let _ = error;
        ErrorClass::Permanent
    }

    /// Checks a key before it is loaded. A key this provider cannot ask for
    /// (one containing the separator of the request's id list, say) fails
    /// its own loads with [`Error::InvalidKey`](crate::Error::InvalidKey),
    /// with `Err`'s reason; the other keys of its batch go on. The default
    /// accepts every key.
    ///
    /// # Errors
    ///
    /// Why the key cannot be loaded.
    fn check_key(&self, key: &Self::Key) -> Result<(), String> {
        let _ = key;
        Ok(())
    }

    /// The key whose [`Display`] form is `text`, if this provider can tell;
    /// the default cannot (`None`).
    ///
    /// Implement it (for most key types, `text.parse().ok()`) to let a
    /// fleet share provider calls under a fleet-wide budget
    /// ([`CacheBuilder::fleet_rate_limit`](crate::CacheBuilder::fleet_rate_limit)
    /// with a [`PgStore`](crate::PgStore) in its default fill mode): while
    /// the budget binds, a call then also carries the keys other instances
    /// start missing between its claim and its turn, which they would
    /// otherwise fetch in turns of their own. Fewer turns are taken, and a
    /// missing key waits for the next turn of the fleet, not of its own
    /// instance. Every instance sharing the namespace must then be able to
    /// fetch every key of it.
    ///
    /// It must invert `Display`: `parse_key(&key.to_string())` is
    /// `Some(key)`. A text it cannot parse (`None`) is not carried; its
    /// lease is released, and the instance that missed it claims it again.
    fn parse_key(&self, text: &str) -> Option<Self::Key> {
        let _ = text;
        None
    }
}

/// How a provider error should be handled; from [`BatchFetch::classify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorClass {
    /// The provider is throttling: not a failed attempt; the call is tried
    /// again after `retry_after` (its `Retry-After`), or after an
    /// exponential backoff when it gave none, for as long as the policy's
    /// [`rate_limit_deadline`](crate::RetryPolicy::with_rate_limit_deadline)
    /// allows. Past it, or when one delay exceeds
    /// [`max_retry_after`](crate::RetryPolicy::with_max_retry_after), the
    /// load fails with [`Error::RateLimited`](crate::Error::RateLimited).
    /// With a fleet-wide limit, every instance pauses until then.
    RateLimited {
        /// How long the provider asked to wait, if it said.
        retry_after: Option<Duration>,
    },
    /// A blip (5xx, a dropped connection, a timeout): retry with exponential
    /// backoff and jitter.
    Transient,
    /// Retrying will not help (4xx, an undecodable answer): fail at once.
    Permanent,
}

#[async_trait::async_trait]
impl<F: BatchFetch + ?Sized> BatchFetch for Arc<F> {
    type Key = F::Key;
    type Value = F::Value;
    type Error = F::Error;

    fn namespace(&self) -> &str {
        (**self).namespace()
    }

    fn max_batch_size(&self) -> usize {
        (**self).max_batch_size()
    }

    async fn fetch(
        &self,
        keys: &[Self::Key],
    ) -> Result<HashMap<Self::Key, Self::Value>, Self::Error> {
        (**self).fetch(keys).await
    }

    async fn fetch_each(
        &self,
        keys: &[Self::Key],
    ) -> Result<HashMap<Self::Key, Result<Self::Value, Self::Error>>, Self::Error> {
        (**self).fetch_each(keys).await
    }

    fn classify(&self, error: &Self::Error) -> ErrorClass {
        (**self).classify(error)
    }

    fn check_key(&self, key: &Self::Key) -> Result<(), String> {
        (**self).check_key(key)
    }

    fn parse_key(&self, text: &str) -> Option<Self::Key> {
        (**self).parse_key(text)
    }
}
