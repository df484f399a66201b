//! Invalidation events: what one instance's invalidations tell the others.

use std::sync::Arc;

/// What an invalidation event says; from
/// [`Cache::invalidations`](crate::Cache::invalidations).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Invalidation {
    /// These keys (their `Display` text) were invalidated.
    Keys(Vec<String>),
    /// Every key of the namespace was invalidated.
    Namespace,
    /// The event connection was lost and has been re-established: events
    /// published meanwhile may have been missed. Treat everything as
    /// invalidated.
    Missed,
}

/// An invalidation event of a store, for one namespace ([`Invalidation::Missed`]
/// concerns every namespace and carries an empty one).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreEvent {
    /// The namespace the event is about.
    pub namespace: Arc<str>,
    /// What happened.
    pub invalidation: Invalidation,
}

impl StoreEvent {
    /// An event; for [`Store`](crate::Store) implementations.
    pub fn new(namespace: impl Into<Arc<str>>, invalidation: Invalidation) -> Self {
        StoreEvent {
            namespace: namespace.into(),
            invalidation,
        }
    }

    /// Whether the event concerns `namespace`.
    pub(crate) fn concerns(&self, namespace: &str) -> bool {
        matches!(self.invalidation, Invalidation::Missed) || &*self.namespace == namespace
    }
}

/// The invalidations of one cache's namespace, from
/// [`Cache::invalidations`](crate::Cache::invalidations): a [`Stream`] that
/// is `Unpin`, so `invalidations.next().await` (with
/// [`futures::StreamExt`]) needs no pinning, and that can be kept in a
/// struct.
///
/// # Lag
///
/// Each subscriber has its own place in the store's event buffer (4,096
/// events for `PgStore`, 1,024 for `MemoryStore`, shared by every namespace
/// of the store). A subscriber that falls further behind than that loses
/// the oldest events and is told so with one [`Invalidation::Missed`], then
/// goes on with the newest: treat `Missed` as "everything may have been
/// invalidated". Nobody else waits for a slow subscriber.
///
/// [`Stream`]: futures::Stream
pub struct Invalidations {
    inner: futures::stream::BoxStream<'static, Invalidation>,
}

impl Invalidations {
    pub(crate) fn new(inner: futures::stream::BoxStream<'static, Invalidation>) -> Self {
        Invalidations { inner }
    }
}

impl std::fmt::Debug for Invalidations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Invalidations").finish_non_exhaustive()
    }
}

impl futures::Stream for Invalidations {
    type Item = Invalidation;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Invalidation>> {
        self.inner.as_mut().poll_next(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}
