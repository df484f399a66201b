//! Events over `LISTEN/NOTIFY`, heard by one listener connection per store:
//! invalidations, published inside the invalidating transaction (so
//! delivered on commit, and only then), and the publishes and releases of
//! leases that other fills wait for.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::broadcast;

use super::table::TableName;
use super::waiters::Waiters;
use crate::{Invalidation, StoreEvent};

/// Postgres refuses payloads of 8,000 bytes or more; stay well below.
const MAX_PAYLOAD: usize = 7_500;

/// The application name of listener connections, so operators (and tests)
/// can find them in `pg_stat_activity`.
pub(crate) const LISTENER_APPLICATION_NAME: &str = "loadlock-listener";

/// The channel of a table's events: `loadlock_` and a hash of its name.
pub(super) fn channel(table: &TableName) -> String {
    let hash = crate::store::fnv1a64(table.to_string().bytes());
    format!("loadlock_{hash:016x}")
}

/// The payloads announcing `keys` of `namespace` (all of it for `None`),
/// each under Postgres' size limit, each made distinct by a nonce (Postgres
/// drops a notification identical to one already queued in the transaction).
pub(super) fn payloads(namespace: &str, keys: Option<&[String]>) -> Vec<String> {
    static NONCE: AtomicU64 = AtomicU64::new(0);
    let nonce = || {
        format!(
            "{}-{}",
            std::process::id(),
            NONCE.fetch_add(1, Ordering::Relaxed)
        )
    };
    let all = || serde_json::json!({ "id": nonce(), "ns": namespace, "all": true }).to_string();
    let Some(keys) = keys else {
        return vec![all()];
    };
    let base = serde_json::json!({ "id": nonce(), "ns": namespace, "keys": [] })
        .to_string()
        .len();
    let mut payloads = Vec::new();
    let mut chunk: Vec<&str> = Vec::new();
    let mut size = base;
    for key in keys {
        let cost = serde_json::to_string(key).map_or(usize::MAX, |k| k.len() + 1);
        if base.saturating_add(cost) > MAX_PAYLOAD {
            // A key too long for any payload: announce the whole namespace.
            return vec![all()];
        }
        if size + cost > MAX_PAYLOAD {
            payloads.push(keys_payload(nonce(), namespace, &chunk));
            chunk.clear();
            size = base;
        }
        chunk.push(key);
        size += cost;
    }
    if !chunk.is_empty() {
        payloads.push(keys_payload(nonce(), namespace, &chunk));
    }
    payloads
}

fn keys_payload(id: String, namespace: &str, keys: &[&str]) -> String {
    serde_json::json!({ "id": id, "ns": namespace, "keys": keys }).to_string()
}

/// What one notification says.
#[derive(Debug, PartialEq)]
enum Heard {
    /// An invalidation, for the application and the waiters.
    Invalidated(StoreEvent),
    /// Leases of these keys were published or released (every key of the
    /// namespace for `None`): only fills waiting for them care.
    Filled {
        namespace: String,
        keys: Option<Vec<String>>,
    },
}

fn strings(value: &serde_json::Value) -> Option<Vec<String>> {
    Some(
        value
            .as_array()?
            .iter()
            .filter_map(|k| k.as_str().map(str::to_owned))
            .collect(),
    )
}

fn parse(payload: &str) -> Option<Heard> {
    let value: serde_json::Value = serde_json::from_str(payload).ok()?;
    let namespace = value.get("ns")?.as_str()?;
    let flag = |name: &str| value.get(name).and_then(|a| a.as_bool()) == Some(true);
    if flag("filled_all") {
        return Some(Heard::Filled {
            namespace: namespace.to_owned(),
            keys: None,
        });
    }
    if let Some(keys) = value.get("filled") {
        return Some(Heard::Filled {
            namespace: namespace.to_owned(),
            keys: Some(strings(keys)?),
        });
    }
    if flag("all") {
        return Some(Heard::Invalidated(StoreEvent::new(
            namespace,
            Invalidation::Namespace,
        )));
    }
    let keys = strings(value.get("keys")?)?;
    Some(Heard::Invalidated(StoreEvent::new(
        namespace,
        Invalidation::Keys(keys),
    )))
}

/// Hands an event to the waiting fills, then (invalidations only) to the
/// application's subscribers.
fn deliver(heard: Heard, waiters: &Waiters, sender: &broadcast::Sender<StoreEvent>) {
    match heard {
        Heard::Filled {
            namespace,
            keys: Some(keys),
        } => waiters.wake_keys(&namespace, keys.iter().map(String::as_str)),
        Heard::Filled {
            namespace,
            keys: None,
        } => waiters.wake_all(Some(&namespace)),
        Heard::Invalidated(event) => {
            match &event.invalidation {
                Invalidation::Keys(keys) => {
                    waiters.wake_keys(&event.namespace, keys.iter().map(String::as_str))
                }
                Invalidation::Namespace => waiters.wake_all(Some(&event.namespace)),
                _ => waiters.wake_all(None),
            }
            // Nobody subscribed is not an error.
            let _ = sender.send(event);
        }
    }
}

/// Listens on `channel` for as long as the store lives (until `closed`
/// reports its end), forwarding events to `sender`. Subscribers are sent
/// [`Invalidation::Missed`] whenever events may have been missed: when the
/// connection is lost, and again once listening (the first time too:
/// anything cached before the first `LISTEN` may have been invalidated
/// unheard).
pub(super) fn spawn_listener(
    runtime: tokio::runtime::Handle,
    options: PgConnectOptions,
    channel: String,
    sender: broadcast::Sender<StoreEvent>,
    waiters: Arc<Waiters>,
    mut closed: tokio::sync::watch::Receiver<()>,
) {
    let options = options.application_name(LISTENER_APPLICATION_NAME);
    runtime.spawn(async move {
        let missed = || {
            deliver(
                Heard::Invalidated(StoreEvent::new("", Invalidation::Missed)),
                &waiters,
                &sender,
            );
        };
        loop {
            if closed.has_changed().is_err() {
                return;
            }
            let options = options.clone();
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_lazy_with(options);
            let listening = async {
                let mut listener = PgListener::connect_with(&pool).await?;
                // A lost connection is reported at once (and `Missed` sent);
                // this loop reconnects. Reconnecting inside `try_recv` would
                // hold the report back for the pool's whole acquire timeout
                // while the server is down.
                listener.eager_reconnect(false);
                listener.listen(&channel).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            let mut listener = match listening.await {
                Ok(listener) => listener,
                Err(err) => {
                    tracing::warn!(%channel, error = %err, "cannot listen for invalidations; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = closed.changed() => return,
                    }
                }
            };
            tracing::debug!(%channel, "listening for invalidations");
            waiters.set_listening(true);
            missed();
            loop {
                let received = tokio::select! {
                    received = listener.try_recv() => received,
                    // The store was dropped.
                    _ = closed.changed() => return,
                };
                match received {
                    Ok(Some(notification)) => match parse(notification.payload()) {
                        Some(heard) => deliver(heard, &waiters, &sender),
                        None => tracing::warn!(%channel, "unreadable event"),
                    },
                    Ok(None) => {
                        tracing::info!(%channel, "invalidation listener lost its connection");
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "invalidation listener lost its connection");
                        break;
                    }
                }
            }
            waiters.set_listening(false);
            missed();
            // The listener holds the pool's one connection: let both go.
            drop(listener);
            drop(pool);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_under_the_limit_and_cover_every_key() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("key-{i}")).collect();
        let announced = payloads("users/v1", Some(&keys));
        assert!(announced.len() > 1);
        let mut seen = Vec::new();
        for payload in &announced {
            assert!(payload.len() < 8_000, "{}", payload.len());
            match parse(payload).unwrap() {
                Heard::Invalidated(StoreEvent {
                    invalidation: Invalidation::Keys(keys),
                    ..
                }) => seen.extend(keys),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(seen, keys);
        // Identical announcements are still distinct payloads.
        let a = payloads_one();
        let b = payloads_one();
        assert_ne!(a, b);
        // A key too long for a payload announces the namespace.
        let long = vec!["x".repeat(9_000)];
        let whole = payloads("ns", Some(&long));
        assert_eq!(
            parse(&whole[0]).unwrap(),
            Heard::Invalidated(StoreEvent::new("ns", Invalidation::Namespace))
        );
    }

    #[test]
    fn publishes_are_told_apart_from_invalidations() {
        assert_eq!(
            parse(r#"{"id":1,"ns":"n","filled":["a","b"]}"#),
            Some(Heard::Filled {
                namespace: "n".into(),
                keys: Some(vec!["a".into(), "b".into()])
            })
        );
        assert_eq!(
            parse(r#"{"id":1,"ns":"n","filled_all":true}"#),
            Some(Heard::Filled {
                namespace: "n".into(),
                keys: None
            })
        );
        assert_eq!(parse(r#"{"ns":"n"}"#), None);
        assert_eq!(parse("not json"), None);
    }

    fn payloads_one() -> String {
        payloads("ns", Some(&["k".to_string()])).remove(0)
    }
}
