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
