//! Calls into the provider (tier 3): chunking to `max_batch_size`, catching
//! panics, turning errors into [`Error`], counting calls.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::try_join_all;
use futures::FutureExt;

use crate::stats::Counters;
use crate::{BatchFetch, Error};

/// The provider with everything the cache puts in front of it.
pub(crate) struct ProviderCaller<F> {
    provider: F,
    namespace: Arc<str>,
    max_batch_size: usize,
}

impl<F: BatchFetch> ProviderCaller<F> {
    /// Reads the provider's settings once; `max_batch_size` must be non-zero.
    pub(crate) fn new(provider: F) -> Result<Self, Error> {
        let max_batch_size = provider.max_batch_size();
        if max_batch_size == 0 {
            return Err(Error::config(format!(
                "provider `{}` has max_batch_size 0; it must be at least 1",
                provider.namespace()
            )));
        }
        let namespace = Arc::from(provider.namespace());
        Ok(ProviderCaller {
            provider,
            namespace,
            max_batch_size,
        })
    }

    pub(crate) fn provider(&self) -> &F {
        &self.provider
    }

    pub(crate) fn namespace(&self) -> &Arc<str> {
        &self.namespace
    }

    pub(crate) fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// Fetches `keys` in chunks of at most `max_batch_size`, run concurrently.
    /// The first failing chunk fails the whole call (and drops the others).
    pub(crate) async fn call(
        &self,
        keys: &[F::Key],
        counters: &Counters,
    ) -> Result<HashMap<F::Key, F::Value>, Error> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let chunks = try_join_all(
            keys.chunks(self.max_batch_size)
                .map(|chunk| self.call_one(chunk, counters)),
        )
        .await?;
        let mut values = HashMap::with_capacity(keys.len());
        for chunk in chunks {
            values.extend(chunk);
        }
        Ok(values)
    }

    async fn call_one(
        &self,
        chunk: &[F::Key],
        counters: &Counters,
    ) -> Result<HashMap<F::Key, F::Value>, Error> {
        Counters::add(&counters.provider_calls, 1);
        Counters::add(&counters.provider_keys, chunk.len());
        tracing::trace!(namespace = %self.namespace, keys = chunk.len(), "provider call");
        match AssertUnwindSafe(self.provider.fetch(chunk))
            .catch_unwind()
            .await
        {
            Ok(Ok(mut values)) => {
                // Keep only what was asked for: extra keys are ignored.
                Ok(chunk
                    .iter()
                    .filter_map(|key| values.remove_entry(key))
                    .collect())
            }
            Ok(Err(err)) => {
                tracing::debug!(namespace = %self.namespace, error = %err, "provider call failed");
                Err(Error::Provider {
                    namespace: self.namespace.clone(),
                    source: Arc::new(err),
                })
            }
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(namespace = %self.namespace, %message, "provider panicked");
                Err(Error::ProviderPanicked {
                    namespace: self.namespace.clone(),
                    message: message.into(),
                })
            }
        }
    }
}

impl<F> fmt::Debug for ProviderCaller<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderCaller")
            .field("namespace", &self.namespace)
            .field("max_batch_size", &self.max_batch_size)
            .finish_non_exhaustive()
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
