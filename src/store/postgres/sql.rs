//! The statements of the Postgres protocol, built once per store for its
//! (validated, quoted) table, and the schema's migrations. Every value is a
//! bound parameter; only validated identifiers are spliced.

use super::table::{Sql, TableName};

/// The statements a [`PgStore`](super::PgStore) runs.
#[derive(Debug)]
pub(crate) struct Statements {
    /// `$1` namespace, `$2` keys, `$3` grace seconds: rows of the
    /// namespace's current generation, fresh or expired less than the grace
    /// ago, with a `fresh` flag; by the database clock at the statement's
    /// start (not the transaction's: the re-read runs after a lock wait).
    pub(crate) select_fresh: Sql,
    /// `$1` key lock ids, `$2` the namespace's lock id, `$3` the seconds the
    /// whole statement may wait: the namespace's lock shared (so a namespace
    /// invalidation waits for this transaction), then every key's
    /// exclusively in ascending order, all in one statement. The outer
    /// `ORDER BY` is what guarantees the order (output expressions are
    /// evaluated after the sort); the lock functions are never in a `WHERE`.
    /// Each lock waits at most the time left of the statement's budget, so
    /// the statement as a whole is bounded, not each lock.
    pub(crate) lock: Sql,
    /// `$1` key lock ids, `$2` the namespace's lock id: only trying; true
    /// when every lock was taken.
    pub(crate) try_lock: Sql,
    /// `$1` the namespace's lock id, `$2` the seconds it may wait,
    /// exclusively: namespace-mode fills and namespace invalidations.
    pub(crate) lock_namespace: Sql,
    /// The same, only trying.
    pub(crate) try_lock_namespace: Sql,
    /// `$1` namespace: starts its next generation, which makes every row of
    /// the older ones a miss (and revokes their leases) in one row write.
    pub(crate) next_generation: Sql,
    /// `$1` lock timeout, `$2` idle-in-transaction timeout: both local to the
    /// transaction (`SET LOCAL` takes no parameters; `set_config` does).
    pub(crate) bound_transaction: Sql,
    /// `$1` namespace, `$2` keys (deduplicated, sorted), `$3` JSON text or
    /// NULL for negative entries, `$4` TTL seconds, `$5` negative TTL
    /// seconds. Expiry is computed from the database clock; any lease on the
    /// rows is revoked (the held-transaction protocol).
    pub(crate) upsert: Sql,
    /// `$1` how many expired rows to delete at most.
    pub(crate) purge_expired: Sql,
    /// `$1` namespace, `$2` keys (deduplicated, sorted): tombstones, rows
    /// that are never fresh (`expires_at = -infinity`), so never served; their
    /// leases are revoked.
    pub(crate) tombstone: Sql,
    /// `$1` namespace, `$2` key, `$3` expected version, `$4` JSON value,
    /// `$5` TTL seconds: the compare-and-set (revoking a lease); returns the
    /// new version.
    pub(crate) put_if_version: Sql,
    /// `$1` namespace, `$2` key: the current version.
    pub(crate) version_of: Sql,
    /// The lease claim, one round trip; see the `_claim` function.
    pub(crate) claim: Sql,
    /// The lease release, one round trip; see the `_release` function.
    pub(crate) release: Sql,
    /// `$1` namespace, `$2` keys, `$3` lease token, `$4` seconds: the rows
    /// of `$2` still leased by `$3` leased for `$4` from now, locked in key
    /// order (as claims and publishes lock rows).
    pub(crate) renew: Sql,
    /// The claim of several fills, only trying locks; see `_claim_tried`.
    pub(crate) claim_tried: Sql,
    /// The publish of several fills; see `_publish_many`.
    pub(crate) publish_many: Sql,
    /// `$1` channel, `$2` payloads: one notification each.
    pub(crate) notify: Sql,
    /// `$1` the call's lease token: its turn came; no claim joins it from
    /// now on. Returns the keys claims leased to it (and forgets calls
    /// whose turn passed long ago: their holders died before it came).
    pub(crate) close_call: Sql,
}

/// The locks of the rows `s(id, shared)`, in one statement, ascending,
/// the namespace's (shared) first, each waiting at most until `deadline`:
/// `lock_timeout` is read when a wait begins, so setting it to the time
/// left right before each lock (in the lock function's argument, which is
/// evaluated first) bounds the statement as a whole. A lock that is free is
/// taken by a try first, which skips that setting (the common case: locks
/// are only ever held for a short statement). Each lock is taken (tried,
/// or waited for) before the next is looked at, so the order holds for
/// waits. Output expressions are evaluated after the sort, so the outer
/// `ORDER BY` fixes the order.
fn bounded_locks(ids: &str, namespace_id: &str, deadline: &str) -> String {
    let id = bounded("s.id", deadline);
    format!(
        "SELECT CASE WHEN s.shared THEN \
                  CASE WHEN pg_try_advisory_xact_lock_shared(s.id) THEN '' \
                  ELSE pg_advisory_xact_lock_shared({id})::text END \
                ELSE CASE WHEN pg_try_advisory_xact_lock(s.id) THEN '' \
                  ELSE pg_advisory_xact_lock({id})::text END END \
         FROM (SELECT {namespace_id}::bigint AS id, true AS shared \
               UNION ALL SELECT DISTINCT unnest({ids}::bigint[]), false) s \
         ORDER BY s.shared DESC, s.id"
    )
}

/// `id`, once `lock_timeout` is set to the time left before `deadline`: the
/// argument of a lock function, so the lock waits at most that long.
fn bounded(id: &str, deadline: &str) -> String {
    format!(
        "CASE WHEN set_config('lock_timeout', \
             greatest(1, ceil(1000 * date_part('epoch', {deadline} - clock_timestamp())))::bigint::text \
             || 'ms', true) <> '' THEN {id} END"
    )
}

/// The current generation of namespace `$1`, as an expression.
fn generation_of(table: &TableName, namespace: &str) -> String {
    format!(
        "coalesce((SELECT n.generation FROM {} n WHERE n.namespace = {namespace}), 0)",
        table.quoted("_namespaces")
    )
}

impl Statements {
    /// The statements of `table`, prepared once per connection or not (see
    /// [`PgStoreBuilder::prepared_statements`](super::PgStoreBuilder::prepared_statements)).
    pub(crate) fn new(table: &TableName, prepared: bool) -> Self {
        let sql = |text: String| Sql::new(text, prepared);
        let t = table.quoted("");
        let next_version = format!("nextval('{}')", table.quoted("_version"));
        let generation = generation_of(table, "$1");
        // date_part returns float8 directly (extract goes through numeric).
        let meta = "version, date_part('epoch', fetched_at), \
                    date_part('epoch', expires_at)";
        let revoke = "lease_token = NULL, lease_holder = NULL, lease_expires_at = NULL, \
                      lease_waiters = false";
        Statements {
            // One primary-key probe per key (the `LIMIT` keeps the lateral
            // subquery a parameterized scan), whatever the table's statistics
            // say about the namespace.
            select_fresh: sql(format!(
                "SELECT k.key, c.value, c.expires_at > statement_timestamp(), \
                        c.version, date_part('epoch', c.fetched_at), \
                        date_part('epoch', c.expires_at) \
                 FROM unnest($2::text[]) AS k(key) \
                 CROSS JOIN LATERAL (SELECT * FROM {t} c \
                     WHERE c.namespace = $1 AND c.key = k.key \
                       AND c.expires_at > statement_timestamp() - make_interval(secs => $3::float8) \
                       AND c.generation = {generation} LIMIT 1) c"
            )),
            lock: sql(bounded_locks(
                "$1",
                "$2",
                "(statement_timestamp() + make_interval(secs => $3::float8))",
            )),
            try_lock: Sql::fixed("SELECT coalesce(bool_and(taken), true) FROM ( \
                         SELECT CASE WHEN s.shared THEN pg_try_advisory_xact_lock_shared(s.id) \
                                ELSE pg_try_advisory_xact_lock(s.id) END AS taken \
                         FROM (SELECT $2::bigint AS id, true AS shared \
                               UNION ALL SELECT DISTINCT unnest($1::bigint[]), false) s \
                         ORDER BY s.shared DESC, s.id) t", prepared),
            lock_namespace: sql(format!(
                "SELECT pg_advisory_xact_lock({})",
                bounded(
                    "$1::bigint",
                    "(statement_timestamp() + make_interval(secs => $2::float8))"
                )
            )),
            try_lock_namespace: Sql::fixed("SELECT pg_try_advisory_xact_lock($1)", prepared),
            next_generation: sql(format!(
                "INSERT INTO {ns} AS n (namespace, generation) VALUES ($1, 1) \
                 ON CONFLICT (namespace) DO UPDATE SET generation = n.generation + 1",
                ns = table.quoted("_namespaces")
            )),
            bound_transaction: Sql::fixed("SELECT set_config('lock_timeout', $1, true), \
                                set_config('idle_in_transaction_session_timeout', $2, true)", prepared),
            upsert: sql(format!(
                "INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version, \
                                       generation) \
                 SELECT $1, u.key, u.value::jsonb, statement_timestamp(), \
                        statement_timestamp() + make_interval(secs => \
                            CASE WHEN u.value IS NULL THEN $5::float8 ELSE $4::float8 END), \
                        {next_version}, {generation} \
                 FROM unnest($2::text[], $3::text[]) AS u(key, value) \
                 ORDER BY u.key \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, fetched_at = EXCLUDED.fetched_at, \
                     expires_at = EXCLUDED.expires_at, version = EXCLUDED.version, \
                     generation = EXCLUDED.generation, {revoke} \
                 RETURNING key, {meta}"
            )),
            tombstone: sql(format!(
                "INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version, \
                                       generation) \
                 SELECT $1, k, NULL, statement_timestamp(), '-infinity', {next_version}, \
                        {generation} \
                 FROM unnest($2::text[]) AS k ORDER BY k \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = NULL, fetched_at = EXCLUDED.fetched_at, expires_at = '-infinity', \
                     version = EXCLUDED.version, generation = EXCLUDED.generation, {revoke}"
            )),
            put_if_version: sql(format!(
                "UPDATE {t} SET value = $4::jsonb, fetched_at = statement_timestamp(), \
                   expires_at = statement_timestamp() + make_interval(secs => $5::float8), \
                   version = {next_version}, {revoke} \
                 WHERE namespace = $1 AND key = $2 AND version = $3 \
                   AND generation = {generation} \
                 RETURNING version"
            )),
            version_of: sql(format!(
                "SELECT version FROM {t} WHERE namespace = $1 AND key = $2 \
                   AND generation = {generation}"
            )),
            purge_expired: sql(format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                     SELECT c.ctid FROM {t} c \
                     WHERE (c.expires_at <= now() \
                            OR c.generation <> {old}) \
                       AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= now()) \
                     LIMIT $1 FOR UPDATE SKIP LOCKED))",
                old = generation_of(table, "c.namespace")
            )),
            claim: sql(format!(
                "SELECT state, token, lease_left, taken_over \
                 FROM {}($1, $2, $3, $4, $5, $6, $7, $8::int4)",
                table.quoted("_claim")
            )),
            release: sql(format!("SELECT {}($1, $2, $3, $4, $5)", table.quoted("_release"))),
            renew: sql(format!(
                "UPDATE {t} c \
                 SET lease_expires_at = clock_timestamp() + make_interval(secs => $4::float8) \
                 FROM (SELECT r.ctid AS tid FROM {t} r \
                       WHERE r.namespace = $1 AND r.key = ANY($2::text[]) AND r.lease_token = $3 \
                       ORDER BY r.key FOR UPDATE) l \
                 WHERE c.ctid = l.tid AND c.lease_token = $3"
            )),
            claim_tried: sql(format!(
                "SELECT state, token, lease_left, taken_over \
                 FROM {}($1, $2, $3, $4, $5, $6, $7::int4)",
                table.quoted("_claim_tried")
            )),
            publish_many: sql(format!(
                "SELECT key, token, version, fetched_at, expires_at \
                 FROM {}($1, $2, $3, $4, $5, $6, $7, $8)",
                table.quoted("_publish_many")
            )),
            notify: Sql::fixed("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", prepared),
            close_call: sql(format!(
                "DELETE FROM {calls} WHERE token = $1 \
                    OR turn_at < clock_timestamp() - interval '10 minutes' \
                 RETURNING token, keys",
                calls = table.quoted("_calls")
            )),
        }
    }
}

/// One step of the schema's history. Applied in order, each once, under an
/// advisory lock; the applied versions are kept in `<table>_migrations`.
pub(crate) struct Migration {
    pub(crate) version: i32,
    pub(crate) description: &'static str,
    pub(crate) statements: fn(&TableName, bool) -> Vec<String>,
}

/// The schema's history. Append only: a released migration never changes.
pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "cache table",
        statements: |table, unlogged| {
            let unlogged = if unlogged { "UNLOGGED " } else { "" };
            // No index beyond the primary key: `value`, `fetched_at` and
            // `expires_at` change on every refill, and an index on any of them
            // would rule out HOT updates. The fill factor leaves room on each
            // page for those updates.
            vec![format!(
                "CREATE {unlogged}TABLE IF NOT EXISTS {} ( \
                 namespace text NOT NULL, \
                 key text NOT NULL, \
                 value jsonb, \
                 fetched_at timestamptz NOT NULL, \
                 expires_at timestamptz NOT NULL, \
                 PRIMARY KEY (namespace, key) \
             ) WITH (fillfactor = 80)",
                table.quoted("")
            )]
        },
    },
    Migration {
        version: 2,
        description: "entry versions",
        statements: |table, _| {
            // Versions come from one sequence, so a key's version only grows,
            // even across a purge that deleted its row.
            vec![
                format!("CREATE SEQUENCE IF NOT EXISTS {}", table.quoted("_version")),
                format!(
                    "ALTER TABLE {} ADD COLUMN IF NOT EXISTS version bigint NOT NULL DEFAULT 0",
                    table.quoted("")
                ),
            ]
        },
    },
    Migration {
        version: 3,
        description: "leases and namespace generations",
        statements: leases,
    },
    Migration {
        version: 4,
        description: "lease functions",
        statements: lease_functions,
    },
    Migration {
        version: 5,
        description: "combined claims and publishes",
        statements: combined_functions,
    },
    Migration {
        version: 6,
        description: "protocol functions find rows by key or row id",
        statements: probing_functions,
    },
    Migration {
        version: 7,
        description: "claims join provider calls waiting for their turn",
        statements: shared_calls,
    },
    Migration {
        version: 8,
        description: "claims open calls, and join them by the keys they lease",
        statements: open_calls,
    },
];

/// Migration 3: lease columns and namespace generations.
fn leases(table: &TableName, unlogged: bool) -> Vec<String> {
    let t = table.quoted("");
    let namespaces = table.quoted("_namespaces");
    let lease_seq = table.quoted("_lease");
    let unlogged = if unlogged { "UNLOGGED " } else { "" };
    vec![
        // `lease_waiters` means something only while `lease_token` is set:
        // the lease was awaited or taken over, so its end is announced.
        format!(
            "ALTER TABLE {t} \
               ADD COLUMN IF NOT EXISTS generation bigint NOT NULL DEFAULT 0, \
               ADD COLUMN IF NOT EXISTS lease_token bigint, \
               ADD COLUMN IF NOT EXISTS lease_holder text, \
               ADD COLUMN IF NOT EXISTS lease_expires_at timestamptz, \
               ADD COLUMN IF NOT EXISTS lease_waiters boolean NOT NULL DEFAULT false"
        ),
        format!(
            "CREATE {unlogged}TABLE IF NOT EXISTS {namespaces} ( \
               namespace text PRIMARY KEY, \
               generation bigint NOT NULL)"
        ),
        format!("CREATE SEQUENCE IF NOT EXISTS {lease_seq}"),
    ]
}

/// Migration 4: the functions of the lease protocol, each one round trip.
///
/// Claims, publishes and releases commit asynchronously
/// (`synchronous_commit = off`, local to their transaction): what a crash
/// of the server may lose is the last few milliseconds of them, which only
/// costs a fetch again (a lease lost with its holder still fetching lets
/// another claim the key: a second call, never a wrong value). Everything
/// that must not be lost commits synchronously: tombstones, writes,
/// compare-and-sets and new generations; and their commit flushes every
/// commit before them, so what survives a crash is always a prefix of the
/// history, never a publish without the invalidation that came after it.
fn lease_functions(table: &TableName, _: bool) -> Vec<String> {
    lease_functions_planned(table, "")
}

/// Every plan of a protocol function generic, made once per session: the
/// plans do not depend on the arguments (primary-key probes, whatever the
/// number of keys), and the planner's default would plan each call anew
/// (it prefers custom plans when the array sizes vary).
const GENERIC_PLANS: &str = "SET plan_cache_mode = force_generic_plan";

/// [`GENERIC_PLANS`] that never scan the whole table. A session's generic
/// plan is made at its first call, often while the table is still empty,
/// when a scan of all of it costs least; without statistics (autovacuum
/// off, or not run yet) nothing makes it plan again as the table grows,
/// and a publish would read every row to find its own. With sequential
/// scans ruled out the rows are found by their row ids or their primary key
/// at any size.
const PROBES_ONLY: &str = "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off";

/// [`PROBES_ONLY`], never compiled: a plan that had to scan anyway (a
/// table with no index for it) costs beyond the JIT's threshold with
/// sequential scans ruled out, and compiling it takes tens of
/// milliseconds, every call.
const PROBES_NO_JIT: &str =
    "SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off";

/// Migration 5: the lease functions planned once per session, and the
/// combined claim and publish of several fills.
fn combined_functions(table: &TableName, _: bool) -> Vec<String> {
    let mut statements = lease_functions_planned(table, GENERIC_PLANS);
    statements.extend(combined(table, GENERIC_PLANS));
    statements
}

/// Migration 6: the protocol's functions planned to find rows by their
/// keys or row ids only, whatever the table held when they were planned.
fn probing_functions(table: &TableName, _: bool) -> Vec<String> {
    let mut statements = lease_functions_planned(table, PROBES_ONLY);
    statements.extend(combined(table, PROBES_ONLY));
    statements
}

/// A row `c` leased at `now_ts` in generation `gen` by a live holder.
const LIVE: &str =
    "(c.generation = gen AND c.lease_token IS NOT NULL AND c.lease_expires_at > now_ts)";

/// A row `c` with a fresh value (or negative entry) at `now_ts`.
const FRESH: &str = "(c.generation = gen AND c.expires_at > now_ts)";

/// Migration 7: provider calls waiting for their turn of a fleet budget,
/// and claims that join them.
///
/// A fill that leased keys and must wait for its turn records its call
/// (`<table>_calls`: its token, when its turn comes, how many more keys it
/// carries). A claim that finds such a call with room for its keys leases
/// them to that call's token instead of a new one, marked as awaited, and
/// answers them as busy: its fill waits for the publish as for any other
/// holder's. When its turn comes the call is deleted (no claim joins it
/// after that) and carries the keys leased to it: one call of the budget
/// for keys several instances were missing. (Migration 8 changed who
/// records a call, and when: the claim that leases its keys.)
fn shared_calls(table: &TableName, unlogged: bool) -> Vec<String> {
    let unlogged = if unlogged { "UNLOGGED " } else { "" };
    vec![
        format!(
            "CREATE {unlogged}TABLE IF NOT EXISTS {} ( \
               token bigint NOT NULL, \
               namespace text NOT NULL, \
               holder text NOT NULL, \
               turn_at timestamptz NOT NULL, \
               room integer NOT NULL, \
               keys text[] NOT NULL DEFAULT '{{}}')",
            table.quoted("_calls")
        ),
        // What a claim looks calls up by, and what their holders close
        // them by (the table holds the calls open now: a few rows, each
        // deleted at its turn). Fills of one combined claim share a
        // token, so a token may have several calls: its first to close
        // carries what joined any of them.
        format!(
            "CREATE INDEX IF NOT EXISTS \"{}_calls_token\" ON {} (token)",
            table.table(),
            table.quoted("_calls")
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS \"{}_calls_turn\" ON {} (namespace, turn_at)",
            table.table(),
            table.quoted("_calls")
        ),
        claim_function(table, PROBES_NO_JIT, true),
        claim_tried_function(table, PROBES_NO_JIT, true),
    ]
}

/// Migration 8: claims open their calls, and join calls by the keys they
/// lease.
///
/// A claim that leases keys to a new token opens that token's call in the
/// same statement (`<table>_calls.turn_at` is from now on when it was
/// opened, not when its turn comes: the order claims join calls in), when
/// the claim's `p_room` (a new last parameter: the provider's batch size,
/// or 0 where calls are not shared) leaves room; the fill closes it at its
/// turn as before. A claim joins a call with room for the keys it would
/// lease, not for all it asks for. Instances of the previous version keep
/// working beside this one (their claims call the functions without
/// `p_room`).
fn open_calls(table: &TableName, _: bool) -> Vec<String> {
    vec![
        claim_function(table, PROBES_NO_JIT, true),
        claim_tried_function(table, PROBES_NO_JIT, true),
    ]
}

/// How a claim that may join an open call (`join`) picks its token and
/// its holder: the oldest open call with room for every key the claim
/// would lease (the rows `u(k)` of `leasable`, a `FROM` item, that have
/// neither a fresh value nor a live lease: keys another holder fetches
/// already take no room), opened less than a lease (`lease_secs`) ago,
/// locked until the claim commits (so it closes after, and carries what
/// this claim leases it; a claim joining it at the same time waits for
/// this one's statement, holding nothing this one waits for); otherwise a
/// new token and `p_holder` (a namespace with no open call costs one
/// probe, not one per key). Without `join`, the latter. Leases start now
/// either way. A claim joins with all its keys or none: a fill whose keys
/// were split between a call and a turn of its own would wait for both,
/// and take a turn anyway (measured: more calls, slower requests). A
/// joining claim also notes which of its keys the call's token leased
/// already (`before`): the fills of one combined claim share a token, and
/// their own keys are theirs to fetch, never the call's to carry.
fn pick_token(table: &TableName, join: bool, leasable: &str, lease_secs: &str) -> String {
    let lease_seq = table.quoted("_lease");
    if !join {
        return format!("tok := nextval('{lease_seq}');");
    }
    let (fresh, live) = (FRESH, LIVE);
    format!(
        "IF EXISTS (SELECT 1 FROM {calls} k WHERE k.namespace = p_ns \
                     AND k.turn_at > now_ts - make_interval(secs => {lease_secs})) THEN \
           SELECT count(*) INTO need FROM {leasable} \
             LEFT JOIN LATERAL (SELECT 1 AS busy FROM {t} c \
               WHERE c.namespace = p_ns AND c.key = u.k AND ({fresh} OR {live}) LIMIT 1) x \
             ON true WHERE x.busy IS NULL; \
           IF need > 0 THEN \
             SELECT k.ctid, k.token, k.holder INTO call_row, tok, holder \
               FROM {calls} k \
               WHERE k.namespace = p_ns AND k.room >= need \
                 AND k.turn_at > now_ts - make_interval(secs => {lease_secs}) \
               ORDER BY k.turn_at LIMIT 1 FOR UPDATE; \
           END IF; \
         END IF; \
         joined := tok IS NOT NULL; \
         IF NOT joined THEN \
           tok := nextval('{lease_seq}'); holder := p_holder; \
         ELSE \
           SELECT coalesce(array_agg(c.key), '{{}}') INTO before FROM {t} c \
             WHERE c.namespace = p_ns AND c.key = ANY(p_keys) AND c.lease_token = tok; \
         END IF;",
        calls = table.quoted("_calls"),
        t = table.quoted("")
    )
}

/// With `join`, the data-modifying `WITH` items that add what a joining
/// claim leased (the rows of `up` leased by `tok` that were not before) to
/// its call's keys, and that open the call of a claim that leased keys to
/// a new token, with room for `p_room` keys less its own (none opened
/// when `p_room` leaves no room: 0 for fills whose calls are not shared).
/// Opened in the statement that leases its keys, the call is joinable as
/// soon as they are leased: claims of other instances that come right
/// after (a burst of misses, all asked for after one publish) join it
/// instead of each taking a turn.
fn record_joined(table: &TableName, join: bool) -> String {
    if !join {
        return String::new();
    }
    let added = "ARRAY(SELECT up.key FROM up WHERE up.lease_token = tok \
                 AND up.key <> ALL(before) AND up.key <> ALL(k.keys))";
    format!(
        ", j AS (UPDATE {calls} k SET keys = k.keys || {added}, \
                   room = k.room - cardinality({added}) \
                 WHERE joined AND k.ctid = call_row RETURNING 1), \
         o AS (INSERT INTO {calls} (token, namespace, holder, turn_at, room) \
                 SELECT tok, p_ns, p_holder, now_ts, p_room - count(*) FROM up \
                 WHERE up.lease_token = tok \
                 HAVING NOT joined AND count(*) > 0 AND p_room - count(*) > 0 RETURNING 1)",
        calls = table.quoted("_calls")
    )
}

/// The `ON CONFLICT` clause of a claim's upsert into `c`: a row without a
/// fresh value and without a live lease is leased (`tok`, `p_holder`, until
/// `until`); a row leased by a live holder is marked as awaited; a row of
/// an older generation is reset to a miss. Fresh rows are left alone.
fn lease_on_conflict(next_version: &str, until: &str, join: bool) -> String {
    let (live, fresh) = (LIVE, FRESH);
    // A claim that joins a call marks what it leases as awaited: its own
    // fill waits for the call's publish.
    let joined = if join { " OR joined" } else { "" };
    let holder = if join { "holder" } else { "p_holder" };
    format!(
        "ON CONFLICT (namespace, key) DO UPDATE SET \
           lease_waiters = (c.generation = gen AND c.lease_token IS NOT NULL){joined}, \
           lease_token = CASE WHEN {live} THEN c.lease_token ELSE tok END, \
           lease_holder = CASE WHEN {live} THEN c.lease_holder ELSE {holder} END, \
           lease_expires_at = CASE WHEN {live} THEN c.lease_expires_at \
                                   ELSE {until} END, \
           value = CASE WHEN c.generation = gen THEN c.value END, \
           fetched_at = CASE WHEN c.generation = gen THEN c.fetched_at ELSE now_ts END, \
           expires_at = CASE WHEN c.generation = gen THEN c.expires_at \
                             ELSE '-infinity' END, \
           version = CASE WHEN c.generation = gen THEN c.version ELSE {next_version} END, \
           generation = gen \
         WHERE NOT {fresh}"
    )
}

/// The claim and the publish of several fills in one statement each (see
/// `combine.rs`), with `plan` (a `SET` clause) on each.
fn combined(table: &TableName, plan: &str) -> Vec<String> {
    let t = table.quoted("");
    let next_version = format!("nextval('{}')", table.quoted("_version"));
    let generation = generation_of(table, "p_ns");
    vec![
        claim_tried_function(table, plan, false),
        // The publish of several fills: `_publish` with a token per key
        // (`p_keys` sorted by key, then token; a key may come twice, with
        // two tokens, of which at most one still holds the row). Returns
        // the keys written with the token they were written under.
        format!(
            "CREATE OR REPLACE FUNCTION {publish}(p_ns text, p_keys text[], p_values text[], \
                 p_tokens bigint[], p_ttl float8, p_negative_ttl float8, p_channel text, \
                 p_lock_timeout text) \
             RETURNS TABLE (key text, token bigint, version bigint, fetched_at float8, \
                            expires_at float8) \
             LANGUAGE plpgsql VOLATILE {plan} AS $$ \
             #variable_conflict use_column \
             DECLARE gen bigint; waited boolean; tids tid[]; payload text; now_ts timestamptz; \
             BEGIN \
               PERFORM set_config('synchronous_commit', 'off', true), \
                       set_config('lock_timeout', p_lock_timeout, true); \
               gen := {generation}; \
               SELECT coalesce(bool_or(x.lease_waiters), false), array_agg(x.tid) \
               INTO waited, tids \
               FROM unnest(p_keys, p_tokens) AS k(k, tok) \
               CROSS JOIN LATERAL (SELECT c.lease_waiters, c.ctid AS tid FROM {t} c \
                 WHERE c.namespace = p_ns AND c.key = k.k AND c.lease_token = k.tok \
                   AND c.generation = gen \
                 LIMIT 1 FOR UPDATE) x; \
               now_ts := clock_timestamp(); \
               RETURN QUERY \
               UPDATE {t} AS c SET value = u.value::jsonb, fetched_at = now_ts, \
                 expires_at = now_ts + make_interval(secs => \
                   CASE WHEN u.value IS NULL THEN p_negative_ttl ELSE p_ttl END), \
                 version = {next_version}, lease_token = NULL, lease_holder = NULL, \
                 lease_expires_at = NULL, lease_waiters = false \
               FROM unnest(p_keys, p_values, p_tokens) AS u(key, value, token) \
               WHERE c.ctid = ANY(tids) AND c.key = u.key AND c.lease_token = u.token \
               RETURNING c.key, u.token, c.version, date_part('epoch', c.fetched_at), \
                         date_part('epoch', c.expires_at); \
               IF waited THEN \
                 payload := json_build_object('id', p_tokens[1], 'ns', p_ns, \
                                              'filled', to_json(p_keys))::text; \
                 IF octet_length(payload) > 7500 THEN \
                   payload := json_build_object('id', p_tokens[1], 'ns', p_ns, \
                                                'filled_all', true)::text; \
                 END IF; \
                 PERFORM pg_notify(p_channel, payload); \
               END IF; \
             END $$",
            publish = table.quoted("_publish_many"),
        ),
    ]
}

/// The lease functions, with `plan` (a `SET` clause, or nothing) on each.
fn lease_functions_planned(table: &TableName, plan: &str) -> Vec<String> {
    let t = table.quoted("");
    let next_version = format!("nextval('{}')", table.quoted("_version"));
    let generation = generation_of(table, "p_ns");
    let asynchronous = "PERFORM set_config('synchronous_commit', 'off', true);";
    // Wakes the waiters of `keys` (a filled or released lease) when the
    // rows say someone waits; the payload names the keys, or the whole
    // namespace when it would not fit in a notification.
    let notify = "IF waited THEN \
                    payload := json_build_object('id', p_token, 'ns', p_ns, 'filled', to_json(p_keys))::text; \
                    IF octet_length(payload) > 7500 THEN \
                      payload := json_build_object('id', p_token, 'ns', p_ns, 'filled_all', true)::text; \
                    END IF; \
                    PERFORM pg_notify(p_channel, payload); \
                  END IF;";
    // How a publish or a release begins: an asynchronous commit, its lock
    // timeout, the namespace's generation, then the rows of `p_keys`
    // (sorted by the caller) still leased by `p_token` locked, one
    // primary-key probe after another in that order (so two writers never
    // wait on each other's rows in a cycle: claims also write rows in key
    // order), telling whether anyone waits for them. A row changed
    // meanwhile is re-checked once its lock is granted (READ COMMITTED's
    // `FOR UPDATE`).
    let take_mine = format!(
        "{asynchronous} \
         PERFORM set_config('lock_timeout', p_lock_timeout, true); \
         gen := {generation}; \
         SELECT coalesce(bool_or(x.lease_waiters), false), array_agg(x.tid) \
         INTO waited, tids \
         FROM unnest(p_keys) AS k(k) \
         CROSS JOIN LATERAL (SELECT c.lease_waiters, c.ctid AS tid FROM {t} c \
           WHERE c.namespace = p_ns AND c.key = k.k AND c.lease_token = p_token \
             AND c.generation = gen \
           LIMIT 1 FOR UPDATE) x;"
    );
    vec![
        claim_function(table, plan, false),
        // The publish, one statement: values and negative entries written
        // where the lease is still `p_token`'s (an invalidation, a write or a
        // namespace generation revoked it otherwise), waiters notified.
        // Returns the keys written, with their version and times.
        format!(
            "CREATE OR REPLACE FUNCTION {publish}(p_ns text, p_keys text[], p_values text[], \
                 p_token bigint, p_ttl float8, p_negative_ttl float8, p_channel text, \
                 p_lock_timeout text) \
             RETURNS TABLE (key text, version bigint, fetched_at float8, expires_at float8) \
             LANGUAGE plpgsql VOLATILE {plan} AS $$ \
             #variable_conflict use_column \
             DECLARE gen bigint; waited boolean; tids tid[]; payload text; now_ts timestamptz; \
             BEGIN \
               {take_mine} \
               now_ts := clock_timestamp(); \
               RETURN QUERY \
               UPDATE {t} AS c SET value = u.value::jsonb, fetched_at = now_ts, \
                 expires_at = now_ts + make_interval(secs => \
                   CASE WHEN u.value IS NULL THEN p_negative_ttl ELSE p_ttl END), \
                 version = {next_version}, lease_token = NULL, lease_holder = NULL, \
                 lease_expires_at = NULL, lease_waiters = false \
               FROM unnest(p_keys, p_values) AS u(key, value) \
               WHERE c.ctid = ANY(tids) AND c.key = u.key \
               RETURNING c.key, c.version, date_part('epoch', c.fetched_at), \
                         date_part('epoch', c.expires_at); \
               {notify} \
             END $$",
            publish = table.quoted("_publish"),
        ),
        // The release of leases whose fill failed: waiters are woken to
        // claim the keys themselves. Returns how many leases were released.
        format!(
            "CREATE OR REPLACE FUNCTION {release}(p_ns text, p_keys text[], p_token bigint, \
                 p_channel text, p_lock_timeout text) \
             RETURNS bigint LANGUAGE plpgsql VOLATILE {plan} AS $$ \
             DECLARE gen bigint; waited boolean; tids tid[]; payload text; released bigint; \
             BEGIN \
               {take_mine} \
               UPDATE {t} AS c SET lease_token = NULL, lease_holder = NULL, \
                 lease_expires_at = NULL, lease_waiters = false \
               WHERE c.ctid = ANY(tids); \
               GET DIAGNOSTICS released = ROW_COUNT; \
               {notify} \
               RETURN released; \
             END $$",
            release = table.quoted("_release"),
        ),
    ]
}

/// The statements that create the migration history table.
pub(crate) fn history_table(table: &TableName) -> Vec<String> {
    let mut statements = Vec::new();
    if let Some(schema) = table.schema() {
        statements.push(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""));
    }
    statements.push(format!(
        "CREATE TABLE IF NOT EXISTS {} ( \
             version integer PRIMARY KEY, \
             description text NOT NULL, \
             applied_at timestamptz NOT NULL DEFAULT now())",
        table.quoted("_migrations")
    ));
    statements
}

/// The names, declarations and expressions that differ between a claim
/// that may join a waiting call and one that may not (see
/// [`pick_token`]).
struct Joining {
    /// Declarations beyond the claim's own.
    declare: &'static str,
    /// The holder recorded with a new lease.
    holder: &'static str,
    /// Beyond the leases' columns, whether the lease is awaited.
    waiters_column: &'static str,
    waiters_value: &'static str,
    /// Whether a key leased by `tok` is this claim's own.
    own: &'static str,
    /// The state answered for a key of its own: 'l', or 'o' when the claim
    /// opened its token's call.
    leased: &'static str,
}

impl Joining {
    fn new(join: bool) -> Self {
        if join {
            Joining {
                declare: " holder text; joined boolean := false; call_row tid; before text[]; \
                          need bigint;",
                holder: "holder",
                waiters_column: ", lease_waiters",
                waiters_value: ", joined",
                own: " AND NOT joined",
                leased: "CASE WHEN EXISTS (SELECT 1 FROM o) THEN 'o' ELSE 'l' END",
            }
        } else {
            Joining {
                declare: "",
                holder: "p_holder",
                waiters_column: "",
                waiters_value: "",
                own: "",
                leased: "'l'",
            }
        }
    }
}

/// The claim of keys (distinct) of several fills, never waiting for a
/// lock, with `plan` (a `SET` clause); with `join`, joining an open call
/// or opening its own (migrations 7 and 8).
fn claim_tried_function(table: &TableName, plan: &str, join: bool) -> String {
    let t = table.quoted("");
    let next_version = format!("nextval('{}')", table.quoted("_version"));
    let generation = generation_of(table, "p_ns");
    let Joining {
        declare,
        holder,
        waiters_column,
        waiters_value,
        own,
        leased,
    } = Joining::new(join);
    // The namespace's lock shared and each key's lock are only tried (each
    // key's in ascending id order, in one statement), and a key whose lock
    // is busy is answered 'u' and left alone (its fill claims it again with
    // `_claim`, which waits). For the keys locked, in a new statement, the
    // lease as `_claim` takes it, each key for its own length. Answers each
    // key in the order of `p_keys`: 'f', 'l' ('o'), 'b' as `_claim`, or 'u'.
    format!(
        "CREATE OR REPLACE FUNCTION {claim}(p_ns text, p_keys text[], p_ids bigint[], \
             p_ns_id bigint, p_holder text, p_lease_secs float8[]{room}) \
         RETURNS TABLE (state text, token bigint, lease_left float8, taken_over bigint) \
         LANGUAGE plpgsql VOLATILE {plan} AS $$ \
         #variable_conflict use_column \
         DECLARE gen bigint; tok bigint; now_ts timestamptz; got bigint[];{declare} \
         BEGIN \
           PERFORM set_config('synchronous_commit', 'off', true); \
           IF NOT pg_try_advisory_xact_lock_shared(p_ns_id) THEN \
             RETURN QUERY SELECT 'u'::text, 0::bigint, NULL::float8, 0::bigint \
               FROM unnest(p_keys); \
             RETURN; \
           END IF; \
           SELECT coalesce(array_agg(l.id) FILTER (WHERE l.taken), '{{}}') INTO got \
           FROM (SELECT s.id, pg_try_advisory_xact_lock(s.id) AS taken \
                 FROM (SELECT DISTINCT unnest(p_ids) AS id) s ORDER BY s.id) l; \
           now_ts := clock_timestamp(); \
           gen := {generation}; \
           {pick} \
           RETURN QUERY \
           WITH up AS ( \
             INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version, \
                                   generation, lease_token, lease_holder, lease_expires_at\
                                   {waiters_column}) \
             SELECT p_ns, u.k, NULL, now_ts, '-infinity', {next_version}, gen, tok, {holder}, \
                    now_ts + make_interval(secs => u.secs){waiters_value} \
             FROM unnest(p_keys, p_ids, p_lease_secs) AS u(k, id, secs) \
             WHERE u.id = ANY(got) ORDER BY u.k \
             {on_conflict} \
             RETURNING c.key, c.lease_token, c.lease_expires_at, c.lease_waiters){joined} \
           SELECT CASE WHEN NOT (u.id = ANY(got)) THEN 'u' WHEN up.key IS NULL THEN 'f' \
                       WHEN up.lease_token = tok{own} THEN {leased} ELSE 'b' END, \
                  tok, date_part('epoch', up.lease_expires_at - now_ts), \
                  coalesce(up.lease_token = tok{own} AND up.lease_waiters, false)::int::bigint \
           FROM unnest(p_keys, p_ids) WITH ORDINALITY AS u(k, id, i) \
           LEFT JOIN up ON up.key = u.k \
           ORDER BY u.i; \
         END $$",
        claim = table.quoted("_claim_tried"),
        room = if join { ", p_room integer" } else { "" },
        pick = pick_token(
            table,
            join,
            "(SELECT * FROM unnest(p_keys, p_ids) AS v(k, id) WHERE v.id = ANY(got)) u",
            "(SELECT max(x) FROM unnest(p_lease_secs) AS x)"
        ),
        joined = record_joined(table, join),
        on_conflict = lease_on_conflict(&next_version, "EXCLUDED.lease_expires_at", join),
    )
}

/// The claim, with `plan` (a `SET` clause); with `join`, joining an open
/// call or opening its own (migrations 7 and 8).
///
/// Run as one statement (its own transaction): the locks, then in a new
/// statement (a new snapshot, READ COMMITTED; and `ON CONFLICT` sees the
/// newest committed row anyway) the leases of what is missing and not
/// leased by a live holder. A key leased by another is marked as awaited,
/// so its publish notifies; so is a lease taken over (its old holder's
/// waiters are told too). Rows the upsert skips are fresh. Answers each
/// key, in the order of `p_keys`: 'f' a fresh row (the fill re-reads it),
/// 'l' leased by this claim ('o' with `join`, when it also opened its
/// token's call), 'b' leased by a live holder (with how long for; a joined
/// call's keys among them), and whether this claim took the key's lease
/// over.
fn claim_function(table: &TableName, plan: &str, join: bool) -> String {
    let t = table.quoted("");
    let next_version = format!("nextval('{}')", table.quoted("_version"));
    let generation = generation_of(table, "p_ns");
    let asynchronous = "PERFORM set_config('synchronous_commit', 'off', true);";
    let Joining {
        declare,
        holder,
        waiters_column,
        waiters_value,
        own,
        leased,
    } = Joining::new(join);
    format!(
        "CREATE OR REPLACE FUNCTION {claim}(p_ns text, p_keys text[], p_ids bigint[], \
             p_ns_id bigint, p_holder text, p_lease_secs float8, p_budget_secs float8{room}) \
         RETURNS TABLE (state text, token bigint, lease_left float8, taken_over bigint) \
         LANGUAGE plpgsql VOLATILE {plan} AS $$ \
         #variable_conflict use_column \
         DECLARE \
           gen bigint; tok bigint; now_ts timestamptz; lease_until timestamptz;{declare} \
         BEGIN \
           {asynchronous} \
           PERFORM * FROM ({locks}) l; \
           now_ts := clock_timestamp(); \
           gen := {generation}; \
           {pick} \
           lease_until := now_ts + make_interval(secs => p_lease_secs); \
           RETURN QUERY \
           WITH up AS ( \
             INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version, \
                                   generation, lease_token, lease_holder, lease_expires_at\
                                   {waiters_column}) \
             SELECT p_ns, k, NULL, now_ts, '-infinity', {next_version}, gen, tok, {holder}, \
                    lease_until{waiters_value} \
             FROM unnest(p_keys) AS k ORDER BY k \
             {on_conflict} \
             RETURNING c.key, c.lease_token, c.lease_expires_at, c.lease_waiters){joined} \
           SELECT CASE WHEN up.key IS NULL THEN 'f' \
                       WHEN up.lease_token = tok{own} THEN {leased} ELSE 'b' END, \
                  tok, date_part('epoch', up.lease_expires_at - now_ts), \
                  coalesce(up.lease_token = tok{own} AND up.lease_waiters, false)::int::bigint \
           FROM unnest(p_keys) WITH ORDINALITY AS k(k, i) \
           LEFT JOIN up ON up.key = k.k \
           ORDER BY k.i; \
         END $$",
        claim = table.quoted("_claim"),
        room = if join { ", p_room integer" } else { "" },
        pick = pick_token(table, join, "unnest(p_keys) AS u(k)", "p_lease_secs"),
        joined = record_joined(table, join),
        on_conflict = lease_on_conflict(&next_version, "lease_until", join),
        locks = bounded_locks(
            "p_ids",
            "p_ns_id",
            "(statement_timestamp() + make_interval(secs => p_budget_secs))"
        ),
    )
}
