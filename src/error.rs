//! The one error type of the crate.

use std::sync::Arc;

/// A boxed, shareable error: one failure is handed to every waiter of a batch.
pub(crate) type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while loading.
///
/// Provider failures ([`Error::Provider`], [`Error::ProviderPanicked`],
/// [`Error::ProviderTimeout`]) are kept apart from the machinery's own
/// failures ([`Error::Store`], [`Error::LockTimeout`], [`Error::RateLimited`],
/// [`Error::Contended`], [`Error::Closed`], [`Error::Config`]), so a caller can tell "the upstream
/// said no" from "the cache is broken or throttled".
///
/// `Error` is `Clone`: when one provider call fails, every load that waited on
/// it receives the same error, sharing the original error behind an `Arc`.
/// Nothing from a failed call is cached; the next load of the same key asks
/// again.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The provider's `fetch` returned an error. The provider's own error is
    /// the [`source`](std::error::Error::source); get it back typed with
    /// [`Error::provider_error`].
    #[error("provider `{namespace}` failed")]
    Provider {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// The error the provider returned.
        #[source]
        source: SharedError,
    },

    /// The provider's `fetch` panicked. The panic was caught; every load that
    /// waited on that call receives this error, and later loads call the
    /// provider again.
    #[error("provider `{namespace}` panicked: {message}")]
    ProviderPanicked {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// The panic payload, when it was a string.
        message: Arc<str>,
    },

    /// The provider asked to back off for longer than the retry policy's
    /// `max_retry_after`, or kept throttling past its rate-limit deadline.
    /// Nothing was cached; try again after `retry_after`.
    #[error("provider `{namespace}` is rate limited; retry after {retry_after:?}")]
    RateLimited {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// How long the provider asked to wait.
        retry_after: std::time::Duration,
    },

    /// Every attempt of a provider call exceeded the provider timeout.
    #[error("provider `{namespace}` did not answer within {timeout:?}")]
    ProviderTimeout {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// The per-call timeout.
        timeout: std::time::Duration,
    },

    /// [`Cache::put_if_version`](crate::Cache::put_if_version) found another
    /// version than expected: someone changed the entry since it was read.
    /// Load it again and retry the change on the fresh version.
    #[error(
        "entry `{key}` in `{namespace}` is at version {actual:?}, not the expected {expected}"
    )]
    VersionMismatch {
        /// The namespace.
        namespace: Arc<str>,
        /// The key's text.
        key: Arc<str>,
        /// The version the caller expected.
        expected: u64,
        /// The version found; `None` when the store has no entry for the key.
        actual: Option<u64>,
    },

    /// The store (tier 2) failed: a database error, a broken connection.
    #[error("cache store failed: {message}")]
    Store {
        /// What the store was doing.
        message: Arc<str>,
        /// The underlying error, if any.
        #[source]
        source: Option<SharedError>,
    },

    /// A fill waited longer than the store's lock timeout for its keys'
    /// locks (another instance held them). Nothing was fetched or written;
    /// loading again later is safe.
    #[error("timed out after {timeout:?} waiting for the locks of {keys} key(s) in `{namespace}`")]
    LockTimeout {
        /// The namespace of the keys.
        namespace: Arc<str>,
        /// How many keys the fill was locking.
        keys: usize,
        /// The configured lock timeout.
        timeout: std::time::Duration,
    },

    /// A key that cannot be loaded: the provider
    /// ([`BatchFetch::check_key`](crate::BatchFetch::check_key)) or the store
    /// ([`Store::check_key`](crate::Store::check_key)) refused it. Only its
    /// own loads fail; the other keys of its batch are loaded.
    #[error("key {key:?} of `{namespace}` cannot be loaded: {reason}")]
    InvalidKey {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// The key's `Display` form.
        key: String,
        /// Why.
        reason: String,
    },

    /// A fill kept losing its keys: its leases were revoked (by
    /// invalidations or writes of the keys) every time it fetched them, or
    /// other holders kept them for more rounds than a fill waits. Nothing
    /// stale was served; loading again may succeed.
    #[error("{keys} key(s) of `{namespace}` stayed contended after {rounds} rounds of claims")]
    Contended {
        /// The provider's namespace.
        namespace: Arc<str>,
        /// How many keys were still unsettled.
        keys: usize,
        /// The rounds made.
        rounds: u32,
    },

    /// The task that was loading this key went away before it finished
    /// (the runtime shut down while a batch was in flight).
    #[error("the load was abandoned before it finished (runtime shutting down?)")]
    Closed,

    /// A load was started outside a tokio runtime: its batch had no runtime
    /// to run on. Load from within a runtime (a `#[tokio::main]`
    /// application, a handler, a `Runtime::block_on`).
    #[error("loads need a tokio runtime, and this one was started outside any")]
    NoRuntime,

    /// An invalid setting was given to a builder.
    #[error("invalid configuration: {0}")]
    Config(Arc<str>),
}

impl Error {
    /// The provider's own error, if this is an [`Error::Provider`] carrying an
    /// error of type `E`.
    ///
    /// ```
    /// # use loadlock::Error;
    /// # fn check(err: &Error) {
    /// if let Some(io) = err.provider_error::<std::io::Error>() {
    ///     eprintln!("upstream I/O failure: {io}");
    /// }
    /// # }
    /// ```
    pub fn provider_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            Error::Provider { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }

    /// Whether the provider (tier 3) caused this error, as opposed to the
    /// cache's own machinery.
    pub fn is_provider(&self) -> bool {
        matches!(
            self,
            Error::Provider { .. } | Error::ProviderPanicked { .. } | Error::ProviderTimeout { .. }
        )
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::Config(message.into().into())
    }

    /// A store failure with an underlying cause; for [`Store`](crate::Store)
    /// implementations.
    pub fn store(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::Store {
            message: message.into().into(),
            source: Some(Arc::new(source)),
        }
    }
}

/// What [`Cache::write`](crate::Cache::write) returns when the cache failed:
/// the error, and your update's output when the update ran.
///
/// The update may have run although the write failed: the store may fail
/// after it (the keys' invalidation, or the commit that releases their
/// locks). Then [`output`](WriteError::output) holds what the update
/// returned, and the keys may still be valid in the cache: invalidate them
/// again ([`Cache::invalidate`](crate::Cache::invalidate)). When the
/// update did not run (the locks could not be taken), `output` is `None`.
#[derive(Debug)]
pub struct WriteError<T> {
    /// What the update returned, if it ran.
    pub output: Option<T>,
    /// What failed.
    pub error: Error,
}

impl<T> WriteError<T> {
    /// Whether the update ran (and the keys may be left valid).
    pub fn update_ran(&self) -> bool {
        self.output.is_some()
    }
}

impl<T> std::fmt::Display for WriteError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.output.is_some() {
            write!(
                f,
                "the update ran, but its keys may not be invalidated: {}",
                self.error
            )
        } else {
            write!(f, "the update did not run: {}", self.error)
        }
    }
}

impl<T: std::fmt::Debug> std::error::Error for WriteError<T> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// The cache's error, without the update's output.
impl<T> From<WriteError<T>> for Error {
    fn from(err: WriteError<T>) -> Self {
        err.error
    }
}
