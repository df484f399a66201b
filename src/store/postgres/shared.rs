//! Provider calls shared by the fleet: under a fleet-wide budget, a fill
//! whose call waits for its turn carries the keys other fills (of any
//! instance) started missing meanwhile.
//!
//! What it guarantees:
//!
//! * **Still exactly once.** A joined key is leased, under its advisory
//!   lock, to the waiting call's token instead of a new one (migration 7's
//!   `_claim`); only the holder of that token fetches it, and its publish
//!   writes it only while the lease is that token's. Invalidations revoke
//!   joined leases as any other.
//! * **Nobody joins a call that has gone.** A claim joins a call only
//!   while its row exists and its turn is ahead, and holds the row locked
//!   until it commits; the call's holder deletes the row when its turn
//!   comes and carries exactly the keys recorded in it.
//! * **Nothing stranded.** The joining fill waits for the call's publish
//!   as for any holder's (woken by its notification, bounded by the
//!   lease; the call renews the leases of what it carries while it
//!   runs). A call whose fill is cancelled before its turn releases the
//!   joined leases at once (in the background); a holder that dies leaves
//!   them to expire and be taken over.
//! * **Only when it can be fetched.** A fill announces its call only when
//!   the provider can tell keys from their texts
//!   ([`BatchFetch::parse_key`](crate::BatchFetch::parse_key)); a joined
//!   text it cannot parse is released at once, not fetched.

use std::sync::Mutex;
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::Row;

use super::conn::Laned;
use super::lease::{Held, Renewal};
use super::PgStore;
use crate::caller::{Answers, SharedCall};
use crate::store::Fill;
use crate::{BatchFetch, Error};

/// What a shared call answered for the keys it carried, once it did.
type Outcome<K, V> = Option<Result<Answers<K, V>, Error>>;

/// What a shared call has done so far.
struct State<K, V> {
    announced: bool,
    closed: bool,
    /// The texts of the keys it carries, sorted, and not yet taken by the
    /// fill (which publishes or releases them).
    carried: Vec<String>,
    /// Their leases renewed while the call runs (retries and rate-limit
    /// waits included), until the fill takes them.
    renewal: Option<Renewal>,
    answers: Outcome<K, V>,
}

/// A fill's side of a shared call (see [`SharedCall`]): announces the
/// call under the fill's lease token, and takes what joined it. Dropped
/// before the fill took the carried keys (its fill cancelled, or the close
/// failed halfway), it closes the call and releases them in the
/// background, so their waiters claim them at once.
pub(super) struct Sharing<'f, F: BatchFetch> {
    store: PgStore,
    namespace: String,
    token: i64,
    /// The fill's own keys' texts, sorted: never carried twice.
    own: Vec<String>,
    provider: &'f F,
    /// The fill's lease length, which carried keys are renewed for.
    lease: Duration,
    state: Mutex<State<F::Key, F::Value>>,
}

impl<'f, F: BatchFetch> Sharing<'f, F> {
    /// The sharing of the fill whose leases are `held`, when its calls may
    /// be shared (see [`Fill::shares_calls`]).
    pub(super) fn new(
        store: &PgStore,
        fill: &Fill<'f, F>,
        held: &Held,
        lease: Duration,
    ) -> Option<Self> {
        let sample = held.keys.first()?;
        fill.shares_calls(sample).then(|| Sharing {
            store: store.clone(),
            namespace: held.namespace.clone(),
            token: held.token,
            own: held.keys.clone(),
            provider: fill.provider.provider(),
            lease,
            state: Mutex::new(State {
                announced: false,
                closed: false,
                carried: Vec::new(),
                renewal: None,
                answers: None,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<F::Key, F::Value>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys the call carried (texts, sorted) and what it answered for
    /// them; from now on the fill publishes or releases them.
    pub(super) fn take(&self) -> (Vec<String>, Outcome<F::Key, F::Value>) {
        let mut state = self.state();
        state.renewal = None;
        (std::mem::take(&mut state.carried), state.answers.take())
    }
}

impl<F: BatchFetch> SharedCall<F::Key, F::Value> for Sharing<'_, F> {
    fn announce(&self, wait: Duration, room: usize) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            if std::mem::replace(&mut self.state().announced, true) {
                return false;
            }
            // Announced before the statement is sent: a cancelled
            // announcement may still reach the server, and is closed then.
            let room = i32::try_from(room).unwrap_or(i32::MAX);
            if let Err(err) = self
                .store
                .open_call(&self.namespace, self.token, wait, room)
                .await
            {
                tracing::warn!(namespace = self.namespace, error = %err,
                    "could not announce a call waiting for its turn; it carries its own keys");
            }
            true
        })
    }

    fn close(&self, room: usize) -> BoxFuture<'_, Vec<F::Key>> {
        Box::pin(async move {
            let joined = match self.store.close_call(self.token).await {
                Ok(joined) => joined,
                Err(err) => {
                    // What joined is released by the drop, or expires.
                    tracing::warn!(namespace = self.namespace, error = %err,
                        "could not close a call at its turn; it carries its own keys");
                    return Vec::new();
                }
            };
            self.state().closed = true;
            let mut joined: Vec<String> = joined
                .into_iter()
                .filter(|text| self.own.binary_search(text).is_err())
                .collect();
            joined.sort_unstable();
            joined.dedup();
            let mut carried = Vec::new();
            let mut texts = Vec::new();
            let mut let_go = Vec::new();
            for text in joined {
                match self.provider.parse_key(&text) {
                    Some(key) if carried.len() < room => {
                        carried.push(key);
                        texts.push(text);
                    }
                    _ => let_go.push(text),
                }
            }
            if !let_go.is_empty() {
                tracing::debug!(
                    namespace = self.namespace,
                    keys = let_go.len(),
                    "keys that joined a call it cannot carry (unparsed, or no room); released"
                );
                if let Err(err) = self
                    .store
                    .release(&self.namespace, &let_go, self.token)
                    .await
                {
                    tracing::warn!(namespace = self.namespace, error = %err,
                        "could not release keys a call could not carry; they expire on their own");
                }
            }
            let renewal = (!texts.is_empty()).then(|| {
                self.store.renew_until_dropped(
                    &self.namespace,
                    texts.clone(),
                    self.token,
                    self.lease,
                )
            });
            let mut state = self.state();
            state.carried = texts;
            state.renewal = renewal;
            carried
        })
    }

    fn answered(&self, answers: Result<Answers<F::Key, F::Value>, Error>) {
        self.state().answers = Some(answers);
    }
}

impl<F: BatchFetch> Drop for Sharing<'_, F> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let open = state.announced && !state.closed;
        let carried = std::mem::take(&mut state.carried);
        if !open && carried.is_empty() {
            return;
        }
        let (store, namespace, token) = (
            self.store.clone(),
            std::mem::take(&mut self.namespace),
            self.token,
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let mut keys = carried;
                if open {
                    match store.close_call(token).await {
                        Ok(joined) => keys.extend(joined),
                        Err(_) => return,
                    }
                }
                keys.sort_unstable();
                keys.dedup();
                let _ = store.release(&namespace, &keys, token).await;
            });
        }
    }
}

impl PgStore {
    /// Records the call of lease `token` as waiting `wait` for its turn,
    /// with room for `room` more keys: one round trip.
    async fn open_call(
        &self,
        namespace: &str,
        token: i64,
        wait: Duration,
        room: i32,
    ) -> Result<(), Error> {
        let inner = &*self.inner;
        self.count_round_trips(1);
        on_conn!(
            &Laned(self),
            "announcing a call",
            Duration::ZERO,
            None,
            |conn| inner
                .sql
                .open_call
                .query()
                .bind(token)
                .bind(namespace)
                .bind(&inner.holder)
                .bind(wait.as_secs_f64())
                .bind(room)
                .execute(conn)
        )?;
        Ok(())
    }

    /// Closes the call of lease `token`: no claim joins it after this.
    /// Returns the keys claims leased to it (in no order): one round trip.
    async fn close_call(&self, token: i64) -> Result<Vec<String>, Error> {
        let inner = &*self.inner;
        self.count_round_trips(1);
        let rows = on_conn!(
            &Laned(self),
            "closing a call",
            Duration::ZERO,
            None,
            |conn| inner.sql.close_call.query().bind(token).fetch_all(conn)
        )?;
        let mut joined = Vec::new();
        for row in rows {
            let read = |e| self.error("reading a closed call", e);
            if row.try_get::<i64, _>(0).map_err(read)? == token {
                joined.extend(row.try_get::<Vec<String>, _>(1).map_err(read)?);
            }
        }
        Ok(joined)
    }
}
