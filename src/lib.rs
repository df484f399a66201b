//! A DataLoader whose cache can be shared by a whole service fleet, and whose
//! misses are filled once per key, under a per-key lock.
//!
//! loadlock is for services that read resources from a slow, rate-limited
//! external provider. Each request gets a [`Loader`] that batches and
//! deduplicates its keys; every loader of a process goes through one
//! [`Cache`], which joins keys already being loaded; the cache keeps values in
//! a [`Store`]; and only keys that are truly missing reach the provider, in
//! batched calls to your [`BatchFetch`] implementation.
//!
//! # Data flow
//!
//! ```text
//! handler ── Loader (one per request) ────────── tier 0: request memo
//!               │  keys asked within one batch window, deduplicated, first-asked order
//!               ▼
//!            Cache (one per provider per process) ── tier 1: local tier (optional),
//!               │                                          in-flight table
//!               │  a key another loader of this process is filling is joined, not
//!               │  fetched again (joined after the optimistic read, before the commit)
//!               ▼
//!            Store ─────────────────────────────── tier 2: MemoryStore, or a shared store
//!               │  1. optimistic read: fresh entries are hits
//!               │  2. misses: lock the keys (ascending lock id), re-read,
//!               ▼
//!            Provider (BatchFetch) ──────────────── tier 3: external
//!                  only keys still missing, in chunks of max_batch_size;
//!                  results (and negative entries) written, then locks released
//! ```
//!
//! # Quick start
//!
//! ```
//! use std::collections::HashMap;
//! use loadlock::{BatchFetch, Cache};
//!
//! struct Squares;
//!
//! #[async_trait::async_trait]
//! impl BatchFetch for Squares {
//!     type Key = u64;
//!     type Value = u64;
//!     type Error = std::convert::Infallible;
//!     fn namespace(&self) -> &str { "squares/v1" }
//!     async fn fetch(&self, keys: &[u64]) -> Result<HashMap<u64, u64>, Self::Error> {
//!         // One call for the whole batch; 13 is "not found".
//!         Ok(keys.iter().filter(|&&k| k != 13).map(|&k| (k, k * k)).collect())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), loadlock::Error> {
//! let cache = Cache::builder(Squares).build()?;   // once per process
//!
//! let loader = cache.loader();                    // once per request
//! assert_eq!(loader.load(7).await?, Some(49));
//! assert_eq!(loader.load(13).await?, None);       // not found is a value
//! let many = loader.load_many([1, 2, 3]).await?;
//! assert_eq!(many[&3], 9);
//! assert!(cache.stats().provider_calls <= 3);
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! * Keys asked within one batch window of a loader reach the provider in one
//!   call (or `ceil(n / max_batch_size)` calls), deduplicated, in first-asked
//!   order. Duplicates and memo hits do not count against the cap. Loads
//!   issued concurrently inside one request (`join_all`, or several tasks the
//!   request spawned at the same moment) share a batch: one task's loads
//!   through one loader handle are dispatched as soon as it stops issuing
//!   them; a loader cloned for spawned tasks waits out its window.
//! * A key another loader of the process is filling is joined, never
//!   fetched twice. With a store shared by several processes, fills take per-key
//!   locks, so each missing key is fetched once per TTL among them.
//! * Not-found is a value: `Ok(None)`, cached as a negative entry for the
//!   negative TTL.
//! * A failed or panicking provider call fails every load waiting on it with
//!   the same [`Error`]; nothing of it is cached; no waiter hangs and no
//!   panic reaches a caller.
//! * Dropping a load future never cancels or stalls the other loads of its
//!   batch, and leaves nothing behind in the in-flight table.
//! * A loader's memo answers each key the same way for the loader's life
//!   ([`Loader::prime`] does not overwrite; [`Loader::clear`] forgets).
//! * [`Cache::invalidate`] takes the same per-key locks as a fill: once it
//!   returns, a load that starts afterwards, on any instance sharing the
//!   store, gets a value fetched after it; a slow fill that read the old
//!   value cannot write it back. [`Cache::write`] holds the keys' locks
//!   while the source changes; [`Cache::put_if_version`] is a
//!   compare-and-set on the entry's [`Entry::version`].
//!
//! # Not guaranteed
//!
//! * Freshness beyond the TTL: a value may be up to `ttl` old when served
//!   (plus the stale-while-revalidate window, if configured).
//! * With the optional local tier, an invalidation made on another instance
//!   reaches this one with its event (milliseconds), not at once.
//! * Ordering between loaders: two requests may see a key's value from two
//!   different fills if its entry expired between them.
//! * Batching across loaders: each loader batches its own keys; loaders share
//!   only the in-flight table and the store.

#![forbid(unsafe_code)]
#![warn(missing_docs, missing_debug_implementations, unreachable_pub)]
// The docs link to the Postgres tier wherever it is the answer; built
// without the `postgres` feature, those links have nothing to point at.
#![cfg_attr(not(feature = "postgres"), allow(rustdoc::broken_intra_doc_links))]

mod batch;
mod builder;
mod cache;
mod caller;
mod config;
mod entry;
mod error;
mod events;
mod fetch;
// Used by the Postgres store only.
#[cfg_attr(not(feature = "postgres"), allow(dead_code))]
mod handoff;
#[cfg(feature = "http")]
mod http;
mod inflight;
mod limit;
mod loader;
mod local;
mod merge;
mod pipeline;
mod retry;
mod stats;
pub mod store;
#[cfg(feature = "testing")]
pub mod testing;

pub use builder::CacheBuilder;
pub use cache::Cache;
pub use config::{
    CacheConfig, DEFAULT_BATCH_WINDOW, DEFAULT_NEGATIVE_TTL, DEFAULT_PROVIDER_TIMEOUT, DEFAULT_TTL,
    MAX_NAMESPACE_LEN, MAX_TTL,
};
pub use entry::Entry;
pub use error::{Error, WriteError};
pub use events::{Invalidation, Invalidations, StoreEvent};
pub use fetch::{BatchFetch, ErrorClass};
#[cfg(feature = "http")]
pub use http::{HttpBatchProvider, HttpError};
pub use limit::Quota;
pub use loader::Loader;
pub use retry::RetryPolicy;
/// The sqlx loadlock speaks (0.9): name its types through this path (for
/// example `loadlock::sqlx::PgPool`) to hand `PgStore::new` a pool of the
/// same version, whatever else your application depends on.
#[cfg(feature = "postgres")]
pub use sqlx;
pub use stats::Stats;
#[cfg(feature = "postgres")]
pub use store::postgres::{FillMode, LockMode, PgRateLimit, PgStore, PgStoreBuilder};
pub use store::{MemoryStore, Store};

/// The README's examples, compiled and run as doctests (they use every
/// feature).
#[cfg(all(doctest, feature = "postgres", feature = "http"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod static_checks {
    //! Compile-time checks of auto traits and object safety.
    use super::*;

    struct P;
    #[async_trait::async_trait]
    impl BatchFetch for P {
        type Key = u64;
        type Value = String;
        type Error = std::io::Error;
        fn namespace(&self) -> &str {
            "p"
        }
        async fn fetch(
            &self,
            _: &[u64],
        ) -> Result<std::collections::HashMap<u64, String>, std::io::Error> {
            Ok(Default::default())
        }
    }

    fn is_send<T: Send>(_: &T) {}
    fn is_send_sync_clone<T: Send + Sync + Clone>() {}

    #[allow(dead_code)]
    fn public_futures_are_send(loader: Loader<P>) {
        is_send(&loader.load(1));
        is_send(&loader.load_many([1, 2]));
    }

    #[test]
    fn handles_are_send_sync_clone() {
        is_send_sync_clone::<Cache<P>>();
        is_send_sync_clone::<Loader<P>>();
        is_send_sync_clone::<MemoryStore>();
        is_send_sync_clone::<Error>();
    }

    fn is_send_unpin<T: Send + Unpin + futures::Stream>() {}

    #[test]
    fn the_event_stream_is_send_and_unpin() {
        is_send_unpin::<Invalidations>();
    }

    #[test]
    fn traits_are_object_safe() {
        let provider: std::sync::Arc<
            dyn BatchFetch<Key = u64, Value = String, Error = std::io::Error>,
        > = std::sync::Arc::new(P);
        let store: std::sync::Arc<dyn Store<P>> = std::sync::Arc::new(MemoryStore::new());
        let cache = Cache::builder(provider).build();
        assert!(cache.is_ok());
        drop(store);
    }
}
