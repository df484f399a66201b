//! [`PgStore`]: the shared tier, one Postgres table for a whole fleet.
//!
//! Every instance of a service points its caches at the same table; misses
//! are filled under `pg_advisory_xact_lock`, so each missing key is fetched
//! from the provider once per TTL across all of them.
//!
//! # The protocol
//!
//! 1. **Optimistic read** — one statement, no transaction, no lock:
//!    `SELECT key, value … WHERE namespace = $1 AND key = ANY($2) AND
//!    expires_at > statement_timestamp()`. Fresh rows are hits.
//! 2. **Fill**, for the keys still missing, in one `READ COMMITTED`
//!    transaction per group of at most
//!    [`max_locks_per_transaction`](PgStoreBuilder::max_locks_per_transaction)
//!    keys:
//!    1. `set_config('lock_timeout', $1, true)` (and a bound on time idle in
//!       the transaction), local to the transaction;
//!    2. all the locks in **one** statement: the namespace's lock *shared*
//!       first (a namespace invalidation takes it exclusively), then every
//!       key's lock in ascending id order, so two transactions can never
//!       wait on each other in a cycle:
//!       `SELECT CASE WHEN shared THEN pg_advisory_xact_lock_shared(id)::text
//!       ELSE pg_advisory_xact_lock(id)::text END FROM (SELECT $2 AS id, true
//!       AS shared UNION ALL SELECT DISTINCT unnest($1::bigint[]), false) s
//!       ORDER BY shared DESC, id` (the outer `ORDER BY` fixes the order:
//!       output expressions are evaluated after the sort);
//!    3. the **re-read**, in a new statement, whose snapshot is taken after
//!       the locks: rows another instance wrote while this one waited are
//!       hits ([`Stats::store_hits_after_lock`](crate::Stats::store_hits_after_lock));
//!    4. the provider, for what is still missing;
//!    5. one upsert of the deduplicated, sorted rows (values and negative
//!       entries) through `unnest`, with expiry from the database clock;
//!    6. `COMMIT`, which releases the locks.
//!
//! An all-hit batch costs one round trip; a batch with misses costs one more
//! transaction of six statements per group, whatever its size
//! ([`PgStore::round_trips`] counts them).
//!
//! Invalidations ([`Cache::invalidate`](crate::Cache::invalidate)) take the
//! same locks, write tombstones (rows that are never fresh), and publish the
//! keys with `pg_notify` in the same transaction; every row carries a
//! `version` from one sequence, so a key's version only grows.
//!
//! # Lock ids
//!
//! [`lock_id`](crate::store::lock_id)`(namespace, key)`, a 64-bit hash
//! computed by the client, pinned by a test. Two keys sharing an id only
//! wait for each other; rows keep the full key, so a collision never returns
//! a wrong value. In [`LockMode::Namespace`] one id per namespace
//! ([`namespace_lock_id`](crate::store::namespace_lock_id)) serializes all
//! fills of the namespace.
//!
//! # The table
//!
//! [`PgStore::migrate`] creates it (default name `loadlock_cache`):
//!
//! ```sql
//! CREATE TABLE loadlock_cache (
//!     namespace  text NOT NULL,
//!     key        text NOT NULL,        -- the key's Display form
//!     value      jsonb,                -- NULL: a negative entry
//!     fetched_at timestamptz NOT NULL,
//!     expires_at timestamptz NOT NULL,     -- '-infinity': invalidated
//!     version    bigint NOT NULL,          -- from <table>_version
//!     PRIMARY KEY (namespace, key)
//! ) WITH (fillfactor = 80);
//! ```
//!
//! Operators can read it with plain SQL, for example
//! `SELECT key, value FROM loadlock_cache WHERE namespace = 'users/v1'`.
//!
//! # Behind PgBouncer
//!
//! The protocol uses transaction-scoped locks and settings only, so it works
//! through PgBouncer in transaction mode. sqlx prepares its statements, so
//! PgBouncer must track prepared statements (version 1.21 or later, with
//! `max_prepared_statements` above zero).

mod events;
mod migrate;
mod rate_limit;
mod sql;
mod store;
mod table;

pub use rate_limit::PgRateLimit;
pub use store::{LockMode, PgStore, PgStoreBuilder};
pub use table::TableName;
