//! [`Entry`]: a cached value with its version and times.

use std::time::SystemTime;

/// A value as the store holds it, from
/// [`Loader::load_entry`](crate::Loader::load_entry).
///
/// `version` only grows for a `(namespace, key)`: every refill, invalidation
/// and [`put_if_version`](crate::Cache::put_if_version) gives the key a
/// larger one (a store-wide counter), so it orders the states a key went
/// through and serves as the expected version of a compare-and-set. A value
/// put in a loader by [`Loader::prime`](crate::Loader::prime) has version 0.
///
/// `fetched_at` and `expires_at` are the store's clock: the database's for
/// `PgStore`, so every instance reads the same times.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Entry<V> {
    /// The value.
    pub value: V,
    /// The entry's version.
    pub version: u64,
    /// When the value was fetched (or put).
    pub fetched_at: SystemTime,
    /// When it stops being fresh.
    pub expires_at: SystemTime,
}

impl<V> Entry<V> {
    /// An entry; for [`Store`](crate::Store) implementations.
    pub fn new(value: V, version: u64, fetched_at: SystemTime, expires_at: SystemTime) -> Self {
        Entry {
            value,
            version,
            fetched_at,
            expires_at,
        }
    }
}

/// An entry shared by every in-process holder (flights, memos, the local
/// tier): cloned out once, where the API hands a value out.
pub(crate) type Shared<V> = std::sync::Arc<Entry<V>>;
