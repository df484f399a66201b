//! One batch of a loader's window: dispatch through the in-flight table,
//! and settlement of every caller.
//!
//! The loader collects the keys (see `loader`) and hands them here as one
//! batch. Keys another loader is already loading are joined; the rest are
//! led by this batch: read from the store, filled from the provider, and
//! handed to every waiter. This module knows nothing of loaders.

use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;

use crate::entry::Shared;
use crate::inflight::{Claim, FailUnfinished, Flight, Lease};
use crate::pipeline::{CacheInner, Tally};
use crate::stats::Counters;
use crate::store::Lookup;
use crate::{BatchFetch, Entry, Error};

/// A batch: its keys (with their flights) in first-asked order, each once.
pub(crate) type Batch<K, V> = Vec<(K, Arc<Flight<V>>)>;

/// Runs one batch to the end: every flight of it is completed when this
/// returns or is dropped, and every key it led has left the in-flight table.
///
/// Keys are read from the store first. Only the keys the read missed enter
/// the in-flight table, to be filled (or joined, when another loader of this
/// process is filling them), and a fill leaves the table before its writes
/// become visible. So a load joins only a fill that has not committed yet:
/// whatever it receives was still the store's newest when it joined, and a
/// load that starts after an invalidation returned never receives a value
/// read before it.
pub(crate) async fn run<F: BatchFetch>(
    cache: &Arc<CacheInner<F>>,
    batch: Batch<F::Key, Shared<F::Value>>,
) {
    let started = Instant::now();
    Counters::add(&cache.counters.batches, 1);
    let _unfinished = FailUnfinished(batch.iter().map(|(_, f)| Arc::clone(f)).collect());
    let mut tally = Tally::default();

    // Keys the provider or the store cannot take fail alone, never the
    // batch they came with.
    let batch: Batch<F::Key, Shared<F::Value>> = batch
        .into_iter()
        .filter_map(|(key, flight)| {
            let refused = cache
                .provider
                .provider()
                .check_key(&key)
                .and_then(|()| cache.store.check_key(&key));
            match refused {
                Ok(()) => Some((key, flight)),
                Err(reason) => {
                    flight.complete(Err(Error::InvalidKey {
                        namespace: Arc::clone(cache.provider.namespace()),
                        key: key.to_string(),
                        reason,
                    }));
                    None
                }
            }
        })
        .collect();

    // The process-local tier first, if there is one.
    let local = cache.local.as_deref();
    let epoch = local.map_or(0, |local| local.epoch());
    // With a local tier, the keys' texts (its keys), each built once and
    // aligned with the batch.
    let mut texts = Vec::new();
    let batch = match local {
        Some(local) => {
            let mut rest = Vec::with_capacity(batch.len());
            let mut hits = Vec::new();
            for (key, flight) in batch {
                let text = key.to_string();
                match local.get(&text) {
                    Some(entry) => hits.push((flight, entry)),
                    None => {
                        rest.push((key, flight));
                        texts.push(text);
                    }
                }
            }
            // Counted before the callers wake.
            Counters::add(&cache.counters.local_hits, hits.len());
            for (flight, entry) in hits {
                flight.complete(Ok(entry));
            }
            rest
        }
        None => batch,
    };
    let mut texts = texts.into_iter();
    if batch.is_empty() {
        return;
    }

    let keys: Vec<F::Key> = batch.iter().map(|(key, _)| key.clone()).collect();
    let looked = match cache.read(&keys, &mut tally).await {
        Ok(looked) => looked,
        Err(err) => {
            for (_, flight) in &batch {
                flight.complete(Err(err.clone()));
            }
            return;
        }
    };
    // Counted before any caller wakes, so a caller reads its own load in the
    // stats.
    tally.record(&cache.counters);

    let mut lease = cache.inflight.lease();
    let mut joins = Vec::new();
    let now = std::time::SystemTime::now();
    let mut to_refresh = Vec::new();
    // Lease positions with a stale entry to serve if the refill fails.
    let mut fallbacks = Vec::new();
    for ((key, flight), lookup) in batch.into_iter().zip(looked) {
        let text = texts.next();
        // What the store answered; otherwise the key is filled, keeping a
        // stale entry (within stale-if-error) to serve if the refill fails.
        let fallback = match lookup {
            Lookup::Hit(entry) => {
                let entry = Shared::new(entry);
                if let (Some(local), Some(text)) = (local, text) {
                    let expires_at = entry.expires_at;
                    local.insert(epoch, text, Some(Shared::clone(&entry)), expires_at);
                }
                flight.complete(Ok(Some(entry)));
                continue;
            }
            Lookup::NegativeHit => {
                if let (Some(local), Some(text)) = (local, text) {
                    let expires_at = now + cache.config.negative_ttl;
                    local.insert(epoch, text, None, expires_at);
                }
                flight.complete(Ok(None));
                continue;
            }
            Lookup::Stale(entry)
                if now.duration_since(entry.expires_at).unwrap_or_default()
                    < cache.config.stale_while_revalidate =>
            {
                Counters::add(&cache.counters.stale_served, 1);
                Counters::add(&cache.counters.store_hits, 1);
                flight.complete(Ok(Some(Shared::new(entry))));
                to_refresh.push(key);
                continue;
            }
            Lookup::Stale(entry) => Some(entry),
            _ => None,
        };
        match cache.inflight.claim(&key, &flight) {
            Claim::Lead => {
                if let Some(entry) = fallback {
                    fallbacks.push((lease.keys().len(), entry));
                }
                lease.push(key, flight);
            }
            Claim::Join(leader) => joins.push((flight, leader)),
        }
    }
    tally.coalesced = joins.len();
    Counters::add(&cache.counters.coalesced, tally.coalesced);
    if lease.keys().is_empty() {
        // No fill follows: a connection the read offered for one goes back.
        crate::handoff::clear();
    }

    let lead = async {
        if !lease.keys().is_empty() {
            let mut filled = Tally::default();
            let leave = |indices: &[usize]| lease.leave(indices);
            let outcome = cache.fill(lease.keys(), &leave, &mut filled).await;
            filled.record(&cache.counters);
            if let (Some(local), Ok(values)) = (local, &outcome) {
                let values = values.iter().map(|value| value.as_ref().ok());
                for (key, value) in lease.keys().iter().zip(values) {
                    let Some(value) = value else {
                        continue;
                    };
                    let expires_at = value.as_ref().map_or_else(
                        || std::time::SystemTime::now() + cache.config.negative_ttl,
                        |entry| entry.expires_at,
                    );
                    local.insert(epoch, key.to_string(), value.clone(), expires_at);
                }
            }
            // Keys whose refill failed, by the provider, answered with their
            // stale entries where stale-if-error allows.
            let stale: Vec<(usize, Entry<F::Value>)> = std::mem::take(&mut fallbacks)
                .into_iter()
                .filter(|(i, _)| match &outcome {
                    Err(err) => stale_if_error_applies(err),
                    Ok(outcomes) => outcomes
                        .get(*i)
                        .is_some_and(|o| o.as_ref().is_err_and(stale_if_error_applies)),
                })
                .collect();
            if !stale.is_empty() {
                serve_stale_on_error(cache, &lease, stale).await;
            }
            // Whatever a read of this fill offered and nothing took.
            crate::handoff::clear();
            lease.settle(outcome);
            filled
        } else {
            Tally::default()
        }
    };
    let follow = join_all(
        joins
            .iter()
            .map(|(mine, leader)| async move { mine.complete(leader.wait().await) }),
    );
    let (filled, _) = futures::join!(lead, follow);
    if !to_refresh.is_empty() {
        cache.spawn_refresh(to_refresh);
    }

    let span = tracing::Span::current();
    span.record("coalesced", tally.coalesced);
    span.record("store_hits", tally.store_hits + filled.store_hits);
    span.record("negative_hits", tally.negative_hits + filled.negative_hits);
    span.record("fetched", filled.fetched);
    span.record("duration_ms", started.elapsed().as_secs_f64() * 1e3);
}

/// Whether a failed refill may be answered with a stale entry: failures of
/// the provider, not of the cache's own machinery.
fn stale_if_error_applies(err: &Error) -> bool {
    err.is_provider() || matches!(err, Error::RateLimited { .. })
}

/// Answers the leased keys at `fallbacks` after a failed refill: with the
/// fresh entry another instance wrote meanwhile, if there is one, or else
/// with their stale entries, but only those still stale at the same version
/// now: an invalidation may have come in while the refill waited for the
/// locks, and an invalidated entry is never served. Every key of the failed
/// fill leaves the in-flight table first, so no load joins a failed flight
/// while this reads; later loads read the store themselves.
async fn serve_stale_on_error<F: BatchFetch>(
    cache: &CacheInner<F>,
    lease: &Lease<'_, F::Key, Shared<F::Value>>,
    fallbacks: Vec<(usize, Entry<F::Value>)>,
) {
    let everything: Vec<usize> = (0..lease.keys().len()).collect();
    lease.leave(&everything);
    let keys: Vec<F::Key> = fallbacks
        .iter()
        .filter_map(|(i, _)| lease.keys().get(*i).cloned())
        .collect();
    let grace = cache.config.stale_if_error;
    let Ok(now) = cache
        .store
        .get(cache.provider.namespace(), &keys, grace)
        .await
    else {
        return;
    };
    for ((index, entry), lookup) in fallbacks.into_iter().zip(now) {
        let Some(flight) = lease.flight(index) else {
            continue;
        };
        // Counted as `Stats` says: every answer here is a store hit; stale
        // ones are also `stale_served`.
        match lookup {
            Lookup::Hit(fresh) => {
                Counters::add(&cache.counters.store_hits, 1);
                flight.complete(Ok(Some(Shared::new(fresh))));
            }
            Lookup::NegativeHit => {
                Counters::add(&cache.counters.store_hits, 1);
                Counters::add(&cache.counters.negative_hits, 1);
                flight.complete(Ok(None));
            }
            Lookup::Stale(current) if current.version == entry.version => {
                Counters::add(&cache.counters.store_hits, 1);
                Counters::add(&cache.counters.stale_served, 1);
                flight.complete(Ok(Some(Shared::new(entry))));
            }
            _ => {}
        }
    }
}
