//! Provider calls shared by the fleet: under a fleet-wide budget that
//! binds, the claim that leases a fill's keys opens its call to the
//! fleet, and until the call's turn comes it carries the keys other fills
//! (of any instance) start missing.
//!
//! What it guarantees:
//!
//! * **Still exactly once.** A joined key is leased, under its advisory
//!   lock, to the open call's token instead of a new one (`_claim`, since
//!   migration 8); only the holder of that token fetches it, and its
//!   publish writes it only while the lease is that token's. Invalidations
//!   revoke joined leases as any other.
//! * **Nobody joins a call that has gone.** A claim joins a call only
//!   while its row exists, and holds the row locked until it commits; the
//!   call's holder deletes the row when its turn comes and carries exactly
//!   the keys recorded in it.
//! * **Open from the claim on.** The call is opened in the statement that
//!   leases its keys, so claims of other instances that come right after
//!   join it instead of taking turns of their own (opened any later, a
//!   burst of claims after a publish each took a turn).
//! * **Nothing stranded.** The joining fill waits for the call's publish
//!   as for any holder's (woken by its notification, bounded by the
//!   lease; the call renews the leases of what it carries while it
//!   runs). A fill that opened a call and does not make it (cancelled,
//!   failed or given up) closes it and releases what joined at once (in
//!   the background); a holder that dies leaves them to expire and be
//!   taken over.
//! * **Closed before what its token fetched is published.** A key of the
//!   fill's own that an invalidation revokes while it is fetched, and that
//!   another instance's claim then joins to the still-open call, is leased
//!   to the same token again. A call is therefore closed at its turn,
//!   before it asks the provider (what joined until then is fetched with
//!   it); and when the fill's keys rode on another call of its process,
//!   once that call answered, before the fill publishes: it carries
//!   nothing, and what joined, such a key included, is released, so the
//!   value fetched before the invalidation is not published under the
//!   token. A call that cannot be closed, or cannot release what it cannot
//!   carry, fails instead.
//! * **Only when it can be fetched.** Claims open calls only for a
//!   namespace whose fills' provider can tell keys from their texts
//!   ([`BatchFetch::parse_key`](crate::BatchFetch::parse_key)); a joined
//!   text it cannot parse is released at once, not fetched.
//! * **Only while the budget binds.** A claim opens a call only while a
//!   call of its cache waited for a turn lately (2 ms or more, within the
//!   last second): otherwise the call goes at once, and a fill that
//!   joined it would wait for its publish and re-read, where a call of its
//!   own takes as long. Joining an open call is always allowed.
//! * **Closed once.** The fills a claim answers (the batches of one read,
//!   or fills whose claims combined) share its token, and so the call it
//!   opened ([`OpenedCall`]): each closes that call before it publishes.
//!   The first close deletes the call's row and takes what joined it; the
//!   others wait for that close to finish instead of sending a statement
//!   that would find the row gone.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use sqlx::Row;

use super::conn::Laned;
use super::lease::{Held, Renewal};
use super::PgStore;
use crate::caller::{Answers, SharedCall};
use crate::store::Fill;
use crate::{BatchFetch, Error};

/// The keys a shared call carries: texts (sorted) and keys.
type Carried<K> = Vec<(String, K)>;

/// What a shared call answered for the keys it carried, once it did.
type Outcome<K, V> = Option<Result<Answers<K, V>, Error>>;

/// The keys a shared call carried, and what it answered for them.
pub(super) type Taken<K, V> = (Carried<K>, Outcome<K, V>);

/// What a shared call has done so far.
struct State<K, V> {
    /// Whether the call's turn came (no more keys join it after).
    closed: bool,
    /// The keys it carries (texts, sorted, and keys), not yet taken by the
    /// fill (which publishes or releases them).
    carried: Carried<K>,
    /// Their leases renewed while the call runs (retries and rate-limit
    /// waits included), until the fill takes them.
    renewal: Option<Renewal>,
    answers: Outcome<K, V>,
}

/// A fill's side of a shared call (see [`SharedCall`]): closes the call
/// its claim opened under the fill's lease token at the call's turn, and
/// takes what joined it. Dropped before the fill took the carried keys
/// (its fill cancelled, or the close failed), it closes the call if it
/// did not and releases them in the background, so their waiters claim
/// them at once.
pub(super) struct Sharing<'f, F: BatchFetch> {
    store: PgStore,
    namespace: String,
    /// The call, under the fill's lease token.
    call: OpenedCall,
    provider: &'f F,
    /// The fill's lease length, which carried keys are renewed for.
    lease: Duration,
    state: Mutex<State<F::Key, F::Value>>,
}

impl<'f, F: BatchFetch> Sharing<'f, F> {
    /// The sharing of the fill whose leases are `held`, when its claim
    /// opened a call (only claims of fills whose calls are shared do, see
    /// [`Fill::shares_calls`]): from now on closing it is this sharing's.
    pub(super) fn new(
        store: &PgStore,
        fill: &Fill<'f, F>,
        held: &mut Held,
        lease: Duration,
    ) -> Option<Self> {
        held.take_call().map(|call| Sharing {
            store: store.clone(),
            namespace: held.namespace.clone(),
            call,
            provider: fill.provider.provider(),
            lease,
            state: Mutex::new(State {
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

    /// The keys the call carried (texts, sorted, and keys) and what it
    /// answered for them; from now on the fill publishes or releases them.
    pub(super) fn take(&self) -> Taken<F::Key, F::Value> {
        let mut state = self.state();
        state.renewal = None;
        (std::mem::take(&mut state.carried), state.answers.take())
    }
}

impl<F: BatchFetch> SharedCall<F::Key, F::Value> for Sharing<'_, F> {
    fn close(&self, room: usize) -> BoxFuture<'_, Result<Vec<F::Key>, Error>> {
        Box::pin(async move {
            if self.state().closed {
                return Ok(Vec::new());
            }
            // On an error, what joined is released by the drop, or expires.
            let mut joined = self.store.close_call(&self.call).await?;
            self.state().closed = true;
            // A key may also be one this process's call asks for already
            // (its lease revoked, then leased to the call by a claim): the
            // caller asks for it once and answers both.
            joined.sort_unstable();
            joined.dedup();
            let mut carried = Vec::new();
            let mut let_go = Vec::new();
            for text in joined {
                match self.provider.parse_key(&text) {
                    Some(key) if carried.len() < room => carried.push((text, key)),
                    _ => let_go.push(text),
                }
            }
            if !let_go.is_empty() {
                tracing::debug!(
                    namespace = self.namespace,
                    keys = let_go.len(),
                    "keys that joined a call it cannot carry (unparsed, or no room); released"
                );
                // Still leased to the call: one of them may be a key of
                // the fill's own that an invalidation revoked and a claim
                // joined to the call again, whose value the fill must not
                // publish. Not let go of, the call fails instead.
                if let Err(err) = self
                    .store
                    .release(&self.namespace, &let_go, self.call.token)
                    .await
                {
                    tracing::warn!(namespace = self.namespace, error = %err,
                        "could not release keys a call could not carry; they expire on their own");
                    return Err(err);
                }
            }
            let renewal = (!carried.is_empty()).then(|| {
                let texts = carried.iter().map(|(text, _)| text.clone()).collect();
                self.store
                    .renew_until_dropped(&self.namespace, texts, self.call.token, self.lease)
            });
            let keys = carried.iter().map(|(_, key)| key.clone()).collect();
            let mut state = self.state();
            state.carried = carried;
            state.renewal = renewal;
            Ok(keys)
        })
    }

    fn answered(&self, answers: Result<Answers<F::Key, F::Value>, Error>) {
        self.state().answers = Some(answers);
    }
}

impl<F: BatchFetch> Drop for Sharing<'_, F> {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        let open = !state.closed;
        let carried: Vec<String> = state.carried.drain(..).map(|(text, _)| text).collect();
        if !open && carried.is_empty() {
            return;
        }
        self.store.release_in_background(
            std::mem::take(&mut self.namespace),
            self.call.token,
            open.then(|| self.call.clone()),
            carried,
            "the keys that joined a cancelled call",
        );
    }
}

/// The call a claim opened for other fills to join, as every fill the
/// claim answered knows it: its token, and its close, which the first of
/// them to close it makes for all (see "Closed once" above).
#[derive(Clone)]
pub(super) struct OpenedCall {
    pub(super) token: i64,
    /// Whether it was closed; held while a close is under way.
    closed: Arc<tokio::sync::Mutex<bool>>,
}

impl OpenedCall {
    /// The call a claim that drew `token` opened.
    pub(super) fn new(token: i64) -> Self {
        OpenedCall {
            token,
            closed: Arc::default(),
        }
    }

    /// Runs `close` unless it ran already, or waits for the caller that
    /// runs it; returns its answer to the caller that ran it, and `None`
    /// to the others once it finished. When it fails (the error is the
    /// caller's that ran it) or is cancelled, the next caller runs its own.
    async fn close_once<T, C, Fut>(&self, close: C) -> Result<Option<T>, Error>
    where
        C: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, Error>>,
    {
        let mut closed = self.closed.lock().await;
        if *closed {
            return Ok(None);
        }
        let answer = close().await?;
        *closed = true;
        Ok(Some(answer))
    }
}

impl PgStore {
    /// Closes `call`: no claim joins it after this. Returns the keys
    /// claims leased to it (in no order) to the first of the fills that
    /// share it to close it, and nothing to the others, which wait for
    /// that close: one round trip, once. A close that failed or was
    /// cancelled is made again by whoever closes next.
    pub(super) async fn close_call(&self, call: &OpenedCall) -> Result<Vec<String>, Error> {
        let joined = call.close_once(|| self.close_call_now(call.token)).await?;
        Ok(joined.unwrap_or_default())
    }

    /// The statement of [`close_call`](Self::close_call).
    async fn close_call_now(&self, token: i64) -> Result<Vec<String>, Error> {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::OpenedCall;
    use crate::Error;

    fn failed() -> Error {
        Error::Store {
            message: "closing a call: connection reset".into(),
            source: None,
        }
    }

    #[tokio::test]
    async fn a_call_is_closed_once_and_the_first_closer_takes_what_joined() {
        let (call, other) = (OpenedCall::new(1), OpenedCall::new(2));
        let runs = AtomicUsize::new(0);
        let close = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            Ok(vec!["7"])
        };
        assert_eq!(call.close_once(close).await.unwrap(), Some(vec!["7"]));
        assert_eq!(call.clone().close_once(close).await.unwrap(), None);
        // Another call is closed on its own.
        assert_eq!(other.close_once(close).await.unwrap(), Some(vec!["7"]));
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn closers_of_a_call_wait_for_the_close_under_way() {
        let call = OpenedCall::new(1);
        let runs = AtomicUsize::new(0);
        let slow = || async {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(vec!["7"])
        };
        let started = tokio::time::Instant::now();
        let (first, second) = tokio::join!(call.close_once(slow), async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let answer = call.close_once(slow).await;
            (answer, started.elapsed())
        });
        assert_eq!(first.unwrap(), Some(vec!["7"]));
        let (second, waited) = second;
        assert_eq!(second.unwrap(), None);
        // Not answered before the close it waited for finished.
        assert!(waited >= Duration::from_millis(50), "{waited:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_close_is_made_again_by_the_next_closer() {
        let call = OpenedCall::new(1);
        let err = call
            .close_once(|| async { Err::<Vec<&str>, _>(failed()) })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Store { .. }), "{err:?}");
        assert_eq!(
            call.close_once(|| async { Ok(vec!["7"]) }).await.unwrap(),
            Some(vec!["7"])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_close_is_made_again_by_the_next_closer() {
        let call = OpenedCall::new(1);
        let never = || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(vec!["late"])
        };
        let cancelled =
            tokio::time::timeout(Duration::from_millis(10), call.close_once(never)).await;
        assert!(cancelled.is_err());
        assert_eq!(
            call.close_once(|| async { Ok(vec!["7"]) }).await.unwrap(),
            Some(vec!["7"])
        );
    }

    #[tokio::test]
    async fn a_call_opened_again_under_a_token_is_closed_again() {
        let call = OpenedCall::new(1);
        assert_eq!(call.close_once(|| async { Ok(1) }).await.unwrap(), Some(1));
        assert_eq!(call.close_once(|| async { Ok(2) }).await.unwrap(), None);
        // The table's sequence drew 1 again (the table made anew): another
        // claim, another call, closed anew.
        let again = OpenedCall::new(1);
        assert_eq!(again.close_once(|| async { Ok(3) }).await.unwrap(), Some(3));
        assert_eq!(again.close_once(|| async { Ok(4) }).await.unwrap(), None);
    }
}
