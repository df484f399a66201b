//! The statements of the Postgres protocol, built once per store for its
//! (validated, quoted) table. Every value is a bound parameter.

use super::table::TableName;

/// The statements a [`PgStore`](super::PgStore) runs.
#[derive(Debug)]
pub(crate) struct Statements {
    /// `$1` namespace, `$2` keys, `$3` grace seconds: rows fresh, or expired
    /// less than the grace ago, with a `fresh` flag; by the database clock
    /// at the statement's start (not the transaction's: the re-read runs
    /// after a lock wait).
    pub(crate) select_fresh: String,
    /// `$1` key lock ids, `$2` the namespace's lock id: the namespace's lock
    /// shared (so a namespace invalidation waits for this transaction), then
    /// every key's exclusively in ascending order, all in one statement. The
    /// outer `ORDER BY` is what guarantees the order (output expressions are
    /// evaluated after the sort); the lock functions are never in a `WHERE`.
    /// Every transaction takes its namespace lock before key locks, so no two
    /// can wait on each other in a cycle.
    pub(crate) lock: &'static str,
    /// The same, only trying: true when every lock was taken.
    pub(crate) try_lock: &'static str,
    /// `$1` the namespace's lock id, exclusively: namespace-mode fills and
    /// namespace invalidations.
    pub(crate) lock_namespace: &'static str,
    /// The same, only trying.
    pub(crate) try_lock_namespace: &'static str,
    /// `$1` namespace: deletes every row of it.
    pub(crate) delete_namespace: String,
    /// `$1` lock timeout, `$2` idle-in-transaction timeout: both local to the
    /// transaction (`SET LOCAL` takes no parameters; `set_config` does).
    pub(crate) bound_transaction: &'static str,
    /// `$1` namespace, `$2` keys (deduplicated, sorted), `$3` JSON text or
    /// NULL for negative entries, `$4` TTL seconds, `$5` negative TTL
    /// seconds. Expiry is computed from the database clock.
    pub(crate) upsert: String,
    /// `$1` how many expired rows to delete at most.
    pub(crate) purge_expired: String,
    /// `$1` namespace, `$2` keys (deduplicated, sorted): tombstones, rows
    /// that are never fresh (`expires_at = -infinity`), so never served.
    pub(crate) tombstone: String,
    /// `$1` namespace, `$2` key, `$3` expected version, `$4` JSON value,
    /// `$5` TTL seconds: the compare-and-set; returns the new version.
    pub(crate) put_if_version: String,
    /// `$1` namespace, `$2` key: the current version.
    pub(crate) version_of: String,
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        let t = table.quoted("");
        let next_version = format!("nextval('{}')", table.quoted("_version"));
        // date_part returns float8 directly (extract goes through numeric).
        let meta = "version, date_part('epoch', fetched_at), \
                    date_part('epoch', expires_at)";
        Statements {
            select_fresh: format!(
                "SELECT key, value, expires_at > statement_timestamp(), {meta} FROM {t} \
                 WHERE namespace = $1 AND key = ANY($2::text[]) \
                   AND expires_at > statement_timestamp() - make_interval(secs => $3::float8)"
            ),
            lock: "SELECT CASE WHEN s.shared THEN pg_advisory_xact_lock_shared(s.id)::text \
                          ELSE pg_advisory_xact_lock(s.id)::text END \
                   FROM (SELECT $2::bigint AS id, true AS shared \
                         UNION ALL SELECT DISTINCT unnest($1::bigint[]), false) s \
                   ORDER BY s.shared DESC, s.id",
            try_lock: "SELECT coalesce(bool_and(taken), true) FROM ( \
                         SELECT CASE WHEN s.shared THEN pg_try_advisory_xact_lock_shared(s.id) \
                                ELSE pg_try_advisory_xact_lock(s.id) END AS taken \
                         FROM (SELECT $2::bigint AS id, true AS shared \
                               UNION ALL SELECT DISTINCT unnest($1::bigint[]), false) s \
                         ORDER BY s.shared DESC, s.id) t",
            lock_namespace: "SELECT pg_advisory_xact_lock($1)",
            try_lock_namespace: "SELECT pg_try_advisory_xact_lock($1)",
            delete_namespace: format!("DELETE FROM {t} WHERE namespace = $1"),
            bound_transaction: "SELECT set_config('lock_timeout', $1, true), \
                                set_config('idle_in_transaction_session_timeout', $2, true)",
            upsert: format!(
                "INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version) \
                 SELECT $1, u.key, u.value::jsonb, statement_timestamp(), \
                        statement_timestamp() + make_interval(secs => \
                            CASE WHEN u.value IS NULL THEN $5::float8 ELSE $4::float8 END), \
                        {next_version} \
                 FROM unnest($2::text[], $3::text[]) AS u(key, value) \
                 ORDER BY u.key \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = EXCLUDED.value, fetched_at = EXCLUDED.fetched_at, \
                     expires_at = EXCLUDED.expires_at, version = EXCLUDED.version \
                 RETURNING key, {meta}"
            ),
            tombstone: format!(
                "INSERT INTO {t} AS c (namespace, key, value, fetched_at, expires_at, version) \
                 SELECT $1, k, NULL, statement_timestamp(), '-infinity', {next_version} \
                 FROM unnest($2::text[]) AS k ORDER BY k \
                 ON CONFLICT (namespace, key) DO UPDATE \
                 SET value = NULL, fetched_at = EXCLUDED.fetched_at, expires_at = '-infinity', \
                     version = EXCLUDED.version"
            ),
            put_if_version: format!(
                "UPDATE {t} SET value = $4::jsonb, fetched_at = statement_timestamp(), \
                   expires_at = statement_timestamp() + make_interval(secs => $5::float8), \
                   version = {next_version} \
                 WHERE namespace = $1 AND key = $2 AND version = $3 RETURNING version"
            ),
            version_of: format!("SELECT version FROM {t} WHERE namespace = $1 AND key = $2"),
            purge_expired: format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM {t} WHERE expires_at <= now() \
                     LIMIT $1 FOR UPDATE SKIP LOCKED)) \
                 AND expires_at <= now()"
            ),
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
];

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
