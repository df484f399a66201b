//! [`PgStore`]: the shared tier, one Postgres table for a whole fleet.
//!
//! Every instance of a service points its caches at the same table; misses
//! are claimed under `pg_advisory_xact_lock` and leased, so each missing key
//! is fetched from the provider once per TTL across all of them, while no
//! connection, transaction or lock is held during a provider call.
//!
//! # The protocol ([`FillMode::Lease`], the default)
//!
//! 1. **Optimistic read** ([`read`](self)) — one statement, no transaction,
//!    no lock: rows of the namespace's current generation that are fresh
//!    are hits. A read never waits for a fill.
//! 2. **Claim**, for the keys still missing, in groups: one statement (a
//!    function, so its own short `READ COMMITTED` transaction):
//!    1. every lock in **one** statement: the namespace's lock *shared*
//!       first (a namespace invalidation takes it exclusively), then every
//!       key's lock in ascending id order:
//!       `SELECT pg_advisory_xact_lock(bounded(id)) FROM (SELECT $ns AS
//!       id, true AS shared UNION ALL SELECT DISTINCT unnest($ids), false) s
//!       ORDER BY shared DESC, id` (the outer `ORDER BY` fixes the order:
//!       output expressions are evaluated after the sort); a free lock is
//!       taken by `pg_try_advisory_xact_lock(id)` first, and only a busy one
//!       is waited for with `pg_advisory_xact_lock(bounded(id))`, whose
//!       argument first sets `lock_timeout` to the time left, so the
//!       statement as a whole waits at most the lock timeout (each lock is
//!       taken before the next is looked at; shared locks use the `_shared`
//!       functions the same way);
//!    2. the **re-read**, in new statements (new snapshots, taken after the
//!       locks): a key with a fresh row is found; a key with a live lease of
//!       another holder is *busy* (and marked as awaited); every other key
//!       is **leased**: a token from a sequence, the holder's name, and an
//!       expiry from the database clock, recorded in its row;
//!    3. the commit, which releases the locks.
//! 3. **Fetch** — the provider, for the leased keys only, holding nothing:
//!    rate limits (charged now, for keys actually leased), retries, chunks
//!    and timeouts as configured. A lease covers the longest the fetch may
//!    take without rate-limit waits (checked at `build()`); waits for
//!    budget have no bound of their own, so while the fetch runs its
//!    leases are renewed every half lease (one statement, the rows still
//!    leased by the token, locked in key order). A holder that died or hung
//!    stops renewing.
//! 4. **Publish** — one statement: values and negative entries are written
//!    only where the lease token is still this fill's; waiters are notified
//!    (`pg_notify`) if any. A key whose lease was revoked (an
//!    invalidation, a write, a compare-and-set, a new namespace generation)
//!    writes nothing, and what was fetched for it is delivered to nobody:
//!    it is claimed again. A failed fetch releases its leases at once: the
//!    fills waiting for them on other instances wake, claim the keys and
//!    call the provider themselves (under their own rate limits and
//!    retries). They do not share the failure: another instance's provider
//!    error cannot cross the database as the typed error it is.
//! 5. **Wait** — a busy key is awaited: the fill wakes once every key it
//!    found busy was published, released or invalidated (each heard
//!    through a notification, those that came between its claim and its
//!    wait included), or on a bounded poll, then re-reads them in one
//!    statement. A lease past its
//!    expiry belongs to a holder that died or hung and is taken over by the
//!    next claim; the old holder's publish is then refused by the token.
//!
//! 6. **Shared calls** ([`shared`](self)) — under a fleet-wide budget
//!    ([`CacheBuilder::fleet_rate_limit`](crate::CacheBuilder::fleet_rate_limit))
//!    and with a provider that can tell keys from their texts
//!    ([`BatchFetch::parse_key`](crate::BatchFetch::parse_key)), while the
//!    budget binds (a call of the cache waited 2 ms or more for its turn
//!    within the last second; otherwise calls go at once, and joining one
//!    would only delay the joiner), the claim that leases keys to a new
//!    token also opens that token's call in `<t>_calls`, in the same
//!    statement: its token, when it was opened, and how many more keys it
//!    has room for (the provider's batch size less its own). A claim, of any instance, that finds an open call
//!    with room for every key it would lease (keys fresh or leased by a
//!    live holder take none) leases them to the oldest such call's token
//!    instead (inside the same statement, under the same locks), records
//!    them in the call's row, and answers them as busy: its fill waits for
//!    the call's publish like for any holder's. Right before its turn of
//!    the budget (a few milliseconds, the round trip's time, so that it
//!    starts at its turn) the call deletes its row (no claim joins it
//!    after that), and at its turn asks the provider for the keys
//!    recorded in it with its own; its publish writes
//!    them under its token and wakes their waiters. So the fleet's misses
//!    ride on the turns already taken instead of each instance taking turns
//!    of its own: fewer calls, and a missing key waits for the fleet's next
//!    turn, not its instance's. Opened by the claim itself, a call is
//!    joinable from the moment its keys are leased, so the claims of a
//!    burst of misses (every instance's requests answered by one publish
//!    ask for their next keys together) join the first of them. A key it
//!    cannot carry (no room left, or a text the provider does not parse) is
//!    released at once; a fill that opened a call and does not make it
//!    (failed, given up, or riding on another call of its process, once
//!    that one answered and before it publishes) closes it and releases
//!    what joined, and a holder that dies leaves it to expire like its own
//!    leases. Open while its token's keys are fetched, a call could take
//!    back a key an invalidation revoked meanwhile, under the same token:
//!    what its close returns is fetched after it, or released.
//!
//! An all-hit batch costs one round trip; a miss batch one claim and one
//! publish per group, whatever its size ([`PgStore::round_trips`] counts
//! them); a shared call one more (closing it right before its turn, once
//! however many of a read's batches share it).
//!
//! Reads, claims and publishes that queue together share a statement
//! (`combine`): most of a statement's cost is fixed (the round trip, the
//! function call, the executor's start-up), so this store's batches and
//! fills of a namespace that wait for a connection at the same time go as
//! one. Each member of a combined read receives exactly its own keys' rows,
//! as that one statement read them. A fill's re-reads combine the same
//! way. A read that finds a lane free with a connection kept for it, and
//! no group waiting, runs at once in its caller's task, without a runner
//! to hand over to. A combined claim only *tries* the locks
//! (`_claim_tried`): a key whose lock is busy is not looked at; its fill
//! tries it again after a short wait (5 ms, or until a publish of the key
//! wakes it), and after three busy answers claims it with the waiting
//! claim above. So no fill waits for a lock because another fill's key was
//! busy, and fills do not queue behind each other's lock waits. A combined
//! publish (`_publish_many`) carries each key's own lease token and
//! answers each fill with its own keys; a fill whose lease was revoked
//! writes nothing while the others publish. A request with a NUL
//! character in a key or value (which the database cannot store) always
//! goes alone, so it fails alone. The protocol's
//! functions use generic plans (`plan_cache_mode = force_generic_plan`),
//! planned once per session instead of at every call.
//!
//! Connections: the short statements — reads and re-reads, claims that
//! only try locks, publishes, releases — run in the store's
//! [lanes](PgStoreBuilder::lanes) (one by default): at most that many at a
//! time, so the statements that queue behind them combine, and a busy
//! server runs fewer, larger statements on fewer sessions. A lane keeps its
//! connection between statements (the pool would test it with a round
//! trip when it comes back and again when it goes out) and returns it to
//! the pool after 100 ms unused; a statement that failed, timed out or was
//! cancelled hands its connection to the pool instead. When a read missed
//! keys, its connection (and lane) goes straight to the claim that follows.
//! Once a fill of the namespace has run (so the store knows how long its
//! leases must be), the read makes that claim itself (`preclaim`): right
//! after its statement, on the same connection, one `_claim_tried` for
//! every key its batches found no value for, each leased as its batch's fill
//! would lease it; the batches whose keys were all found are answered
//! before it, and the batches that missed receive the read's rows at once
//! and the claim's answer when their fills need it. A fill takes the
//! leases of the keys it leads; leases no fill takes (its batch joined a
//! fill of this process instead) are released as soon as every batch of
//! the read let go of the answer. Otherwise (before the first fill, or for
//! a batch that missed a stale value, which it may serve), the batches of a
//! combined read that missed share the connection and their claims run
//! together on it (the first waits at most 2 ms for the others to join). Statements
//! that may wait for a lock or for user code (a claim waiting for a busy
//! lock, renewals, invalidations, writes, held-transaction fills, purges)
//! take no lane and a connection of the pool. Waiting for a lane or a
//! connection is never raced against anything but its deadline (a
//! cancelled acquire may drop a connection the pool was opening). No
//! connection is held across a provider call or any other wait.
//!
//! Durability: claims, publishes and releases commit with
//! `synchronous_commit = off` (local to their transaction). A crash of the
//! server loses at most their last few milliseconds, which costs a fetch
//! again, never a wrong value: tombstones, writes, compare-and-sets and
//! namespace generations commit synchronously, and their commit flushes
//! every commit before them, so what survives is a prefix of the history.
//!
//! A lease lasts as long as its fetch may take — every chunk of the group,
//! each attempt at the provider timeout, each retry or `Retry-After` wait —
//! plus a margin, at most [`max_lease`](PgStoreBuilder::max_lease); groups
//! are cut so their lease fits.
//!
//! Invalidations ([`Cache::invalidate`](crate::Cache::invalidate)) take the
//! same locks, write tombstones (rows that are never fresh) that revoke the
//! keys' leases, and publish the keys with `pg_notify` in the same
//! transaction; every row carries a `version` from one sequence, so a key's
//! version only grows. A whole-namespace invalidation starts the
//! namespace's next *generation* (one row in `<t>_namespaces`): rows of
//! older generations are misses, so it costs the same for ten keys or ten
//! million; [`PgStore::purge_expired`] reclaims them.
//!
//! [`FillMode::HeldTransaction`] keeps the older protocol: one transaction
//! per group holds the locks from the re-read through the provider call to
//! the upsert and commit.
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
//!     namespace        text NOT NULL,
//!     key              text NOT NULL,     -- the key's Display form
//!     value            jsonb,             -- NULL: a negative entry
//!     fetched_at       timestamptz NOT NULL,
//!     expires_at       timestamptz NOT NULL,  -- '-infinity': invalidated
//!     version          bigint NOT NULL,       -- from <table>_version
//!     generation       bigint NOT NULL,       -- the namespace's, when written
//!     lease_token      bigint,                -- the live lease, if any
//!     lease_holder     text,
//!     lease_expires_at timestamptz,
//!     lease_waiters    boolean NOT NULL,      -- someone awaits the publish
//!     PRIMARY KEY (namespace, key)
//! ) WITH (fillfactor = 80);
//! ```
//!
//! Operators can read it with plain SQL, for example
//! `SELECT key, value FROM loadlock_cache WHERE namespace = 'users/v1'`, or
//! see the fills in progress with
//! `SELECT key, lease_holder, lease_expires_at FROM loadlock_cache WHERE
//! lease_token IS NOT NULL`, and the open calls (with the keys that
//! joined them) with `SELECT * FROM loadlock_cache_calls`.
//! Beside it, `<table>_namespaces` holds the namespaces' generations and
//! `<table>_calls` the open calls (a few rows at a time; a holder that
//! died leaves its row, which claims stop joining once a lease would have
//! ended and the next call to close forgets after 10 minutes).
//!
//! # Behind PgBouncer
//!
//! The protocol uses transaction-scoped locks and settings only (advisory
//! `xact` locks, `set_config(…, true)`), so it works through PgBouncer in
//! transaction mode, tested against Debian's PgBouncer 1.18:
//!
//! * **Statements.** sqlx prepares its statements per connection. PgBouncer
//!   1.21 or later with `max_prepared_statements` above zero keeps them per
//!   client, and needs nothing else. Older versions (or
//!   `max_prepared_statements = 0`) need
//!   [`PgStoreBuilder::prepared_statements(false)`](PgStoreBuilder::prepared_statements)
//!   (and the same on [`PgRateLimit`]): every statement is sent unprepared,
//!   each round trip in a transaction of its own.
//! * **Events.** `LISTEN` does not survive transaction pooling: give the
//!   listener a direct connection with
//!   [`PgStoreBuilder::listener_url`]. Without one, an unprepared store
//!   publishes no events (see `prepared_statements` for what that
//!   changes).
//! * **PgBouncer's settings.** `pool_mode = transaction`, and
//!   `ignore_startup_parameters = extra_float_digits` (sqlx sets it at
//!   connect).

/// Runs `$work` (a future returning `Result<T, Error>` that uses `$conn`, a
/// pooled connection) within the query timeout plus `$extra`, the wait for
/// the connection included. A connection whose work finished in time goes
/// to `$then` (`fn(&PgStore, Conn, &Result<T, Error>)`, by default
/// [`PgStore::done_with`]); one whose work timed out is discarded, never
/// returned to the pool: it may be half-open, or still busy on the server.
macro_rules! in_conn {
    ($store:expr, $doing:expr, $extra:expr, |$conn:ident| $work:expr) => {
        in_conn!($store, $doing, $extra, then $crate::store::postgres::PgStore::done_with, |$conn| $work)
    };
    ($store:expr, $doing:expr, $extra:expr, then $then:expr, |$conn:ident| $work:expr) => {{
        let store = $store;
        let doing = $doing;
        let limit = store.inner.query_timeout.saturating_add($extra);
        let deadline = tokio::time::Instant::now() + limit;
        let mut pooled = store.acquire(doing, deadline, limit).await?;
        pooled.start();
        let outcome = {
            let $conn: &mut sqlx::PgConnection = &mut pooled;
            tokio::time::timeout_at(deadline, $work).await
        };
        match outcome {
            Ok(result) => {
                $then(store, pooled, &result);
                result
            }
            Err(_) => {
                drop(pooled.detach());
                Err(store.timed_out(doing, limit))
            }
        }
    }};
}

/// [`in_conn!`] for one statement's future (`Result<T, sqlx::Error>`); a
/// lock timeout becomes [`Error::LockTimeout`](crate::Error::LockTimeout)
/// when `$locks` names what was being locked. Without prepared statements
/// the statement runs in a transaction of its own, so that a transaction
/// pooler keeps one server connection for its parse and its execution.
macro_rules! on_conn {
    ($store:expr, $doing:expr, $extra:expr, $locks:expr, |$conn:ident| $work:expr) => {
        on_conn!($store, $doing, $extra, $locks,
            then $crate::store::postgres::PgStore::done_with, |$conn| $work)
    };
    ($store:expr, $doing:expr, $extra:expr, $locks:expr, then $then:expr,
     |$conn:ident| $work:expr) => {{
        let store = $store;
        let doing = $doing;
        let locks = $locks;
        in_conn!(store, doing, $extra, then $then, |whole| async {
            let pinned = !store.inner.prepared;
            if pinned {
                sqlx::raw_sql("BEGIN")
                    .execute(&mut *whole)
                    .await
                    .map_err(|e| store.db_error(doing, locks, e))?;
            }
            let result = {
                let $conn: &mut sqlx::PgConnection = &mut *whole;
                $work.await
            };
            if pinned {
                let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
                let ended = sqlx::raw_sql(end).execute(&mut *whole).await;
                if let (Ok(_), Err(e)) = (&result, ended) {
                    return Err(store.db_error(doing, locks, e));
                }
            }
            result.map_err(|e| store.db_error(doing, locks, e))
        })
    }};
}

mod combine;
mod conn;
mod events;
mod held;
mod invalidate;
mod lease;
mod locked;
mod migrate;
mod preclaim;
mod rate_limit;
mod read;
mod rows;
mod shared;
mod sql;
mod store;
mod table;
mod waiters;

pub use rate_limit::PgRateLimit;
pub use store::{FillMode, LockMode, PgStore, PgStoreBuilder, DEFAULT_LANES};
pub use table::TableName;

/// The most connections the pool of [`PgStore::connect`] keeps.
pub const CONNECT_POOL_SIZE: u32 = 10;

/// How long a load waits for a connection of [`PgStore::connect`]'s pool
/// (and of [`PgRateLimit::connect`]'s) before it fails with
/// [`Error::Store`](crate::Error::Store).
pub const CONNECT_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A pool of at most `size` connections to `url`, one of them opened now.
async fn connect_pool(url: &str, size: u32) -> Result<sqlx::PgPool, crate::Error> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(crate::Error::config(
            "a Postgres connection URL starts with postgres:// or postgresql://",
        ));
    }
    let options: sqlx::postgres::PgConnectOptions = url.parse().map_err(|e: sqlx::Error| {
        // The URL may hold a password: name the problem, not the URL.
        crate::Error::config(format!("not a Postgres connection URL: {e}"))
    })?;
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(CONNECT_ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|e| crate::Error::store("connecting to Postgres", e))
}
