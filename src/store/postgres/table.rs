//! [`TableName`]: a validated, optionally schema-qualified table name, and
//! [`Sql`], the statements built around it.

use std::fmt;
use std::sync::Arc;

use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{AssertSqlSafe, FromRow, SqlSafeStr, SqlStr};

use crate::Error;

/// The longest table name accepted: Postgres identifiers are at most 63
/// bytes, and the store keeps its migration history in `<table>_migrations`.
const MAX_TABLE_LEN: usize = 63 - "_migrations".len();

/// A table name that is safe to put in SQL: `table` or `schema.table`, each
/// part an ASCII identifier (`[A-Za-z_][A-Za-z0-9_]*`, at most 63 bytes, the
/// table at most 52). Anything else is rejected, never spliced into a
/// statement. Parts are always double-quoted in SQL, so their case is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    table: String,
}

impl TableName {
    /// Parses `table` or `schema.table`.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming what is wrong with `name`.
    pub fn parse(name: &str) -> Result<Self, Error> {
        let mut parts = name.split('.');
        let (schema, table) = match (parts.next(), parts.next(), parts.next()) {
            (Some(table), None, None) => (None, table),
            (Some(schema), Some(table), None) => (Some(schema), table),
            _ => {
                return Err(Error::config(format!(
                    "table name {name:?} must be `table` or `schema.table`"
                )))
            }
        };
        if let Some(schema) = schema {
            check_identifier(name, schema, 63)?;
        }
        check_identifier(name, table, MAX_TABLE_LEN)?;
        Ok(TableName {
            schema: schema.map(str::to_owned),
            table: table.to_owned(),
        })
    }

    /// The schema, if the name was qualified.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's own name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The quoted SQL form of this table, or of a sibling table named
    /// `<table><suffix>` in the same schema.
    pub(crate) fn quoted(&self, suffix: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}{suffix}\"", self.table),
            None => format!("\"{}{suffix}\"", self.table),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.table),
            None => f.write_str(&self.table),
        }
    }
}

/// A statement built by this crate: its text is the crate's own, with no
/// part from outside it but identifiers a [`TableName`] validated and
/// quoted; every value is a bound parameter. This is the one place such a
/// text is vouched for to sqlx ([`AssertSqlSafe`]), so it is built once per
/// store and shared (cloning it does not copy the text). It also knows
/// whether it may be prepared once per connection (see
/// [`PgStoreBuilder::prepared_statements`](super::PgStoreBuilder::prepared_statements)).
#[derive(Clone)]
pub(crate) struct Sql {
    text: SqlStr,
    prepared: bool,
}

impl Sql {
    /// `text` must come from this crate's statement templates and
    /// [`TableName::quoted`], never from a caller's input.
    pub(super) fn new(text: String, prepared: bool) -> Self {
        Sql {
            text: AssertSqlSafe(Arc::<str>::from(text)).into_sql_str(),
            prepared,
        }
    }

    /// A text written in this crate.
    pub(super) fn fixed(text: &'static str, prepared: bool) -> Self {
        Sql {
            text: text.into_sql_str(),
            prepared,
        }
    }

    /// The statement, for `sqlx::query`.
    pub(crate) fn query(&self) -> Query<'static, Postgres, PgArguments> {
        sqlx::query(self.text.clone()).persistent(self.prepared)
    }

    /// The statement, for `sqlx::query_as`.
    pub(crate) fn query_as<O>(&self) -> QueryAs<'static, Postgres, O, PgArguments>
    where
        O: for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_as(self.text.clone()).persistent(self.prepared)
    }

    /// The statement, for `sqlx::query_scalar`.
    pub(crate) fn query_scalar<O>(&self) -> QueryScalar<'static, Postgres, O, PgArguments>
    where
        (O,): for<'r> FromRow<'r, PgRow>,
    {
        sqlx::query_scalar(self.text.clone()).persistent(self.prepared)
    }
}

impl fmt::Debug for Sql {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.text.as_str(), f)
    }
}

fn check_identifier(name: &str, part: &str, max: usize) -> Result<(), Error> {
    let mut chars = part.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let valid_rest = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid_start || !valid_rest {
        return Err(Error::config(format!(
            "table name {name:?}: {part:?} is not an identifier \
             (letters, digits and `_`, not starting with a digit)"
        )));
    }
    if part.len() > max {
        return Err(Error::config(format!(
            "table name {name:?}: {part:?} is longer than {max} bytes"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_qualified_names() {
        let plain = TableName::parse("loadlock_cache").unwrap();
        assert_eq!(plain.quoted(""), "\"loadlock_cache\"");
        assert_eq!(plain.quoted("_migrations"), "\"loadlock_cache_migrations\"");
        let qualified = TableName::parse("Cache.Entries_2").unwrap();
        assert_eq!(qualified.schema(), Some("Cache"));
        assert_eq!(qualified.quoted(""), "\"Cache\".\"Entries_2\"");
        assert_eq!(qualified.to_string(), "Cache.Entries_2");
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "1table",
            "a.b.c",
            ".t",
            "s.",
            "users; DROP TABLE users",
            "quo\"te",
            "sp ace",
            "ünï",
            &"x".repeat(53),
        ] {
            let err = TableName::parse(bad).unwrap_err();
            assert!(matches!(err, Error::Config(_)), "{bad:?}: {err}");
        }
        assert!(TableName::parse(&"x".repeat(52)).is_ok());
    }
}
