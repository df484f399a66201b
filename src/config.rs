//! The settings of a cache: defaults, limits, and the [`CacheConfig`]
//! snapshot of what a cache was built with.

use std::time::Duration;

use crate::RetryPolicy;

/// The default time a value stays fresh: 5 minutes.
pub const DEFAULT_TTL: Duration = Duration::from_secs(300);
/// The default time a negative entry stays fresh: 1 minute.
pub const DEFAULT_NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// The longest TTL kept: about 100 years. Longer TTLs (`Duration::MAX` for
/// "never expire") are capped to it.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
/// The default limit on one provider call: 10 s.
pub const DEFAULT_PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// The default batch window: 500 µs, the longest a loader collects keys.
///
/// A window ends early when nothing more can come: the keys one request
/// task issues through one loader handle (a `join_all`, `load_many`,
/// resolvers sharing `&loader`) are dispatched as soon as that task
/// stopped issuing them and no key came for 200 µs more, and a window
/// that holds a full provider call is dispatched at once. Keys of a loader
/// cloned for other tasks (tasks a request spawns, which other worker
/// threads may still be starting) or issued from outside any task wait
/// out the whole window.
///
/// Chosen by measurement (`cargo run --release --example batch_window`, 2
/// cores, 2 worker threads): requests that spawn 8 tasks at once, each
/// with a clone of the request's loader, loading 10 keys, with an instant
/// provider, on the default (bounded) `MemoryStore`.
///
/// | window | batches / request | mean latency (1 request at a time) | with 16 concurrent requests |
/// |---|---|---|---|
/// | 0 | 7.39 | 0.34 ms | 7.98 batches, 2.53 ms |
/// | 50 µs | 1.00 | 1.53 ms | 1.01 batches, 4.63 ms |
/// | 500 µs | 1.00 | 2.03 ms | 1.00 batch, 4.46 ms |
/// | 1 ms | 1.00 | 2.59 ms | 1.00 batch, 5.42 ms |
/// | 5 ms | 1.00 | 6.77 ms | 1.00 batch, 9.97 ms |
///
/// A zero window splits such requests into several batches; a non-zero one
/// batches them whole, because tokio's timer rounds every sleep up to its
/// next 1 ms tick. 500 µs leaves margin for tasks that do a little work
/// before they load, at half a millisecond less latency than 1 ms. One
/// task's loads do not wait for the timer at all: 1,000 concurrent loads
/// of one request take 0.50x async-graphql's time (`cargo bench --bench
/// loader`).
pub const DEFAULT_BATCH_WINDOW: Duration = Duration::from_micros(500);

/// The longest [`BatchFetch::namespace`](crate::BatchFetch::namespace) a cache accepts, in bytes. Every
/// invalidation event names its namespace, and a Postgres notification
/// carries less than 8,000 bytes (JSON escaping can make a namespace
/// several times longer): a longer namespace would make every invalidation
/// fail.
pub const MAX_NAMESPACE_LEN: usize = 1024;

/// The settings a cache was built with; from [`Cache::config`](crate::Cache::config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheConfig {
    /// How long a fetched value stays fresh in the store.
    pub ttl: Duration,
    /// How long a negative entry ("not found") stays fresh in the store.
    pub negative_ttl: Duration,
    /// The longest a loader collects keys before dispatching them as one
    /// batch.
    pub batch_window: Duration,
    /// Whether a loader always waits its whole batch window (or until it
    /// holds a full provider call), instead of dispatching as soon as no
    /// more keys arrive.
    pub wait_full_window: bool,
    /// How long past its expiry an entry is still served at once while one
    /// background refresh renews it (zero: off).
    pub stale_while_revalidate: Duration,
    /// How long past its expiry an entry is served when refilling it fails
    /// at the provider (zero: off).
    pub stale_if_error: Duration,
    /// The provider's `max_batch_size`, read once when the cache was built.
    pub max_batch_size: usize,
    /// The limit on one provider call; past it the call counts as a transient
    /// failure.
    pub provider_timeout: Duration,
    /// How many chunks of one batch call the provider at the same time.
    pub chunk_concurrency: usize,
    /// How failed provider calls are retried.
    pub retry: RetryPolicy,
}
