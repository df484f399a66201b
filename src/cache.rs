//! [`Cache`]: the process-wide handle, shared by every loader of one
//! provider: loaders, invalidation, writes, events and statistics.

use std::fmt;
use std::sync::Arc;

use crate::pipeline::CacheInner;
use crate::stats::Counters;
use crate::{
    BatchFetch, CacheConfig, Error, Invalidation, Invalidations, Loader, Stats, WriteError,
};

/// The process-wide cache of one provider: the in-flight table (tier 1) in
/// front of a [`Store`](crate::Store) (tier 2) in front of the provider (tier 3).
///
/// Build one per provider per process with [`Cache::builder`], keep it in the
/// application state, and create a [`Loader`] per request with
/// [`Cache::loader`]. `Cache` is cheap to clone (an `Arc` inside); clones
/// share everything.
///
/// A cache spawns its batches on the tokio runtime of the task that loads;
/// load only from within a tokio runtime (outside one, loads fail with
/// [`Error::NoRuntime`]).
pub struct Cache<F: BatchFetch> {
    pub(crate) inner: Arc<CacheInner<F>>,
}

impl<F: BatchFetch> Clone for Cache<F> {
    fn clone(&self) -> Self {
        Cache {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<F: BatchFetch> fmt::Debug for Cache<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", self.inner.provider.namespace())
            .field("config", &self.inner.config)
            .field("in_flight", &self.inner.inflight.len())
            .finish_non_exhaustive()
    }
}

impl<F: BatchFetch> Cache<F> {
    /// A new per-request loader. Cheap: create one per request (or per
    /// GraphQL execution) so that its memo lives as long as the request.
    pub fn loader(&self) -> Loader<F> {
        Loader::new(Arc::clone(&self.inner))
    }

    /// Invalidates `keys` after their source of truth changed: their entries
    /// are never served again, and the next load of each fetches it afresh.
    ///
    /// Invalidation takes the same per-key locks as a fill: it waits for
    /// fills of the keys in progress anywhere (in every instance sharing the
    /// store), and no fill can interleave with it. So once it returns, a
    /// load that starts afterwards, on any instance, returns a value the
    /// provider gave after the invalidation took the key's lock; a slow fill
    /// that fetched the old value before cannot write it back. The classic
    /// race ("invalidate, then a slow reader writes back old data") cannot
    /// happen. Change the source first, then invalidate.
    ///
    /// Not covered: a [`Loader`] that already answered a key keeps its
    /// answer for its life (one request, one value per key; use
    /// [`Loader::clear`] to forget it).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future before it returns may leave the keys invalidated
    /// or not (each group of keys is one transaction); invalidate again.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] when the store fails, [`Error::LockTimeout`] when a
    /// fill held a key longer than the store's lock timeout.
    pub async fn invalidate(&self, keys: impl IntoIterator<Item = F::Key>) -> Result<(), Error> {
        let keys: Vec<F::Key> = keys.into_iter().collect();
        if keys.is_empty() {
            return Ok(());
        }
        let result = self
            .inner
            .store
            .invalidate(self.inner.provider.namespace(), &keys)
            .await;
        if let Some(local) = &self.inner.local {
            // At once, whether or not the store succeeded: the entries may be
            // gone there already.
            let texts: Vec<String> = keys.iter().map(ToString::to_string).collect();
            local.evict(&texts);
        }
        if result.is_ok() {
            Counters::add(&self.inner.counters.invalidations, keys.len());
            tracing::debug!(namespace = %self.inner.provider.namespace(), keys = keys.len(), "invalidated");
        }
        result
    }

    /// Invalidates every key of this cache's namespace (after a bulk change
    /// of the source). It waits for the namespace's fills in progress and
    /// holds new ones back until it is durable, so the guarantee of
    /// [`invalidate`](Self::invalidate) holds for every key.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the namespace invalidated or not;
    /// invalidate again.
    ///
    /// # Errors
    ///
    /// [`Error::Store`] or [`Error::LockTimeout`].
    pub async fn invalidate_namespace(&self) -> Result<(), Error> {
        let result = self
            .inner
            .store
            .invalidate_namespace(self.inner.provider.namespace())
            .await;
        if let Some(local) = &self.inner.local {
            local.flush();
        }
        result
    }

    /// Write-through under the keys' locks: runs `write` (your update of the
    /// source of truth) while holding the locks of `keys`, then invalidates
    /// them before the locks are released, and returns `write`'s output.
    ///
    /// Writers and readers of these keys are serialized: no fill runs
    /// alongside the write, none that started before can write back what it
    /// read, and loads that start after this returns fetch afresh. This is
    /// the stronger form of "invalidate first, then write". Keep `write`
    /// short: it holds the keys' locks (and, with `PgStore`, a connection
    /// and a transaction bounded by its idle-in-transaction timeout). Do not
    /// load the written keys through this store inside `write`: the load
    /// would wait for the locks the write holds (with `PgStore` until the
    /// lock timeout, with `MemoryStore` for ever); and if your update uses
    /// the store's pool, size it for one more connection per write.
    ///
    /// The keys are invalidated whether `write` succeeded or not (a failed
    /// write may have changed part of the source).
    ///
    /// # Cancel safety
    ///
    /// Dropping the future releases the locks; `write` may have run or not,
    /// and the keys may be left valid: invalidate them again.
    ///
    /// # Errors
    ///
    /// A [`WriteError`] when the cache failed ([`Error::Store`],
    /// [`Error::LockTimeout`]): with the update's output when the update ran
    /// and the failure came after it (the keys may then be left valid:
    /// invalidate them again), without when it did not run. `write`'s own
    /// result is returned inside `Ok` once the keys are invalidated.
    pub async fn write<T: Send>(
        &self,
        keys: impl IntoIterator<Item = F::Key>,
        write: impl std::future::Future<Output = T> + Send,
    ) -> Result<T, WriteError<T>> {
        let keys: Vec<F::Key> = keys.into_iter().collect();
        let output = std::sync::Mutex::new(None);
        let work: futures::future::BoxFuture<'_, ()> = Box::pin(async {
            let value = write.await;
            *output.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        });
        let locked = self
            .inner
            .store
            .write_locked(self.inner.provider.namespace(), &keys, work)
            .await;
        if let Some(local) = &self.inner.local {
            let texts: Vec<String> = keys.iter().map(ToString::to_string).collect();
            local.evict(&texts);
        }
        let output = output.into_inner().unwrap_or_else(|e| e.into_inner());
        match (locked, output) {
            (Ok(()), Some(output)) => Ok(output),
            (Ok(()), None) => Err(WriteError {
                output: None,
                error: Error::Closed,
            }),
            (Err(error), output) => Err(WriteError { output, error }),
        }
    }

    /// Compare-and-set for update-on-write users (optimistic locking): if the
    /// entry of `key` is still at version `expected` (from
    /// [`Loader::load_entry`]), replaces its value with `value`, fresh for
    /// the cache's TTL, and returns the new version. Takes the key's lock, so
    /// it serializes with fills and invalidations.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future may leave the put done or not; load the entry to
    /// see which.
    ///
    /// # Errors
    ///
    /// [`Error::VersionMismatch`] when the entry changed (or is gone) since
    /// it was read; [`Error::Store`] or [`Error::LockTimeout`].
    pub async fn put_if_version(
        &self,
        key: F::Key,
        expected: u64,
        value: F::Value,
    ) -> Result<u64, Error> {
        let put = self
            .inner
            .store
            .put_if_version(
                self.inner.provider.namespace(),
                &key,
                expected,
                value,
                self.inner.config.ttl,
            )
            .await;
        if let Some(local) = &self.inner.local {
            local.evict(&[key.to_string()]);
        }
        put
    }

    /// The invalidations of this cache's namespace, from every instance
    /// sharing the store: an event bus for the application. It yields
    /// [`Invalidation::Missed`] when events may have been lost (the store's
    /// event connection was re-established, or this subscriber fell more
    /// than a few thousand events behind), and ends when the store stops
    /// publishing. Empty for a store without events.
    ///
    /// Events are delivered after the invalidating transaction committed,
    /// typically within milliseconds; they are a notification, not the
    /// guarantee: [`invalidate`](Self::invalidate) itself is what makes
    /// later loads fresh. The stream is `Unpin`; see [`Invalidations`] for
    /// what a subscriber that lags behind sees.
    pub fn invalidations(&self) -> Invalidations {
        let namespace: Arc<str> = self.inner.provider.namespace().clone();
        let events = futures::stream::unfold(self.inner.store.subscribe(), move |receiver| {
            let namespace = namespace.clone();
            async move {
                let mut receiver = receiver?;
                loop {
                    match receiver.recv().await {
                        Ok(event) if event.concerns(&namespace) => {
                            return Some((event.invalidation, Some(receiver)));
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                            return Some((Invalidation::Missed, Some(receiver)));
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        Invalidations::new(Box::pin(events))
    }

    /// The number of entries in the process-local tier (0 without one).
    pub fn local_len(&self) -> u64 {
        self.inner.local.as_ref().map_or(0, |local| local.len())
    }

    /// A snapshot of this cache's counters.
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot(self.inner.inflight.len())
    }

    /// The settings this cache was built with.
    pub fn config(&self) -> CacheConfig {
        self.inner.config
    }

    /// The provider's namespace.
    pub fn namespace(&self) -> &str {
        self.inner.provider.namespace()
    }

    /// The provider this cache fetches from.
    pub fn provider(&self) -> &F {
        self.inner.provider.provider()
    }
}
