//! What a fill writes: the provider's answers as rows (JSON text, or none
//! for a negative entry), and the entries the written rows became.
//!
//! Shared by both fill protocols: the held-transaction upsert and the
//! lease publish write the same rows and return the same columns (`key`,
//! then `version, fetched_at, expires_at`).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::SystemTime;

use sqlx::postgres::PgRow;
use sqlx::Row;

use super::read::row_meta;
use crate::store::Filled;
use crate::{Entry, Error};

/// `rows` sorted by key, each key once (the first of its rows), as the
/// columns a statement binds: keys, and values aligned with them.
fn columns(mut rows: Vec<(&str, Option<String>)>) -> (Vec<&str>, Vec<Option<String>>) {
    rows.sort_by(|a, b| a.0.cmp(b.0));
    rows.dedup_by(|a, b| a.0 == b.0);
    rows.into_iter().unzip()
}

/// The rows of one fill's answers, sorted by key and deduplicated (one
/// statement may not touch a row twice, and concurrent writers take row
/// locks in one order), with each key's fetched value kept to settle it.
pub(super) struct Encoded<'t, V> {
    /// The keys' texts, sorted, deduplicated.
    pub(super) keys: Vec<&'t str>,
    /// Aligned with `keys`: the value's JSON, `None` for a negative entry.
    pub(super) values: Vec<Option<String>>,
    /// Per key: its index into the fill's keys and what the provider gave.
    fetched: HashMap<&'t str, (usize, Option<V>)>,
}

impl<'t, V: serde::Serialize> Encoded<'t, V> {
    /// The answers for the fill's keys at `indices` (into `texts`, the
    /// keys' texts; `keys` the same keys, aligned with `indices`). A key
    /// absent from `answered` is not found.
    pub(super) fn new<K: Eq + Hash>(
        texts: &'t [String],
        indices: &[usize],
        keys: &[K],
        mut answered: HashMap<K, V>,
    ) -> Result<Self, Error> {
        let mut rows: Vec<(&'t str, Option<String>)> = Vec::with_capacity(indices.len());
        let mut fetched = HashMap::with_capacity(indices.len());
        for (&i, key) in indices.iter().zip(keys) {
            let text = texts[i].as_str();
            let value = answered.remove(key);
            let json = value
                .as_ref()
                .map(serde_json::to_string)
                .transpose()
                .map_err(|e| Error::store(format!("value of key {text:?} is not JSON"), e))?;
            rows.push((text, json));
            fetched.insert(text, (i, value));
        }
        let (keys, values) = columns(rows);
        Ok(Encoded {
            keys,
            values,
            fetched,
        })
    }

    /// Adds rows that are not the fill's own keys (keys another fill
    /// joined to its call), kept sorted and distinct; nobody here is
    /// answered with them.
    pub(super) fn carry(&mut self, rows: Vec<(&'t str, Option<String>)>) {
        if rows.is_empty() {
            return;
        }
        let all = self.keys.drain(..).zip(self.values.drain(..)).chain(rows);
        (self.keys, self.values) = columns(all.collect());
    }

    /// Answers each key the statement wrote with the entry it became;
    /// returns the indices of the keys it did not write, in ascending order.
    pub(super) fn settle(
        mut self,
        written: Vec<Written>,
        answers: &mut [Option<Filled<V>>],
    ) -> Vec<usize> {
        for Written {
            key,
            version,
            fetched_at,
            expires_at,
        } in written
        {
            if let Some((i, value)) = self.fetched.remove(key.as_str()) {
                answers[i] =
                    Some(Filled::Fetched(value.map(|value| {
                        Entry::new(value, version, fetched_at, expires_at)
                    })));
            }
        }
        let mut lost: Vec<usize> = self.fetched.into_values().map(|(i, _)| i).collect();
        lost.sort_unstable();
        lost
    }
}

/// A row a fill wrote: its key, and the version and times it was written
/// with.
pub(super) struct Written {
    pub(super) key: String,
    pub(super) version: u64,
    pub(super) fetched_at: SystemTime,
    pub(super) expires_at: SystemTime,
}

impl Written {
    /// From a row `key, …, version, fetched_at, expires_at`, the version at
    /// column `meta`; `None` when the key or the metadata does not read (the
    /// key is then claimed again, as one whose lease was lost).
    pub(super) fn from_row(row: &PgRow, meta: usize) -> Option<Self> {
        let key = row.try_get::<String, _>(0).ok()?;
        let (version, fetched_at, expires_at) = row_meta(row, meta).ok()?;
        Some(Written {
            key,
            version,
            fetched_at,
            expires_at,
        })
    }
}
