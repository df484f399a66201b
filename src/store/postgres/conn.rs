//! The store's lanes: the protocol's short statements (optimistic reads
//! and re-reads, claims that only try locks, publishes, releases) each run
//! on a [`Conn`] that holds a pooled connection *and* one of the store's
//! [`lanes`](super::PgStoreBuilder::lanes), so one store runs at most that
//! many of them at a time, however large the pool. Statements that may wait
//! for a lock or for user code (a waiting claim, lease renewals,
//! invalidations, writes, held-transaction fills, purges) take no lane:
//! they never make the short ones queue behind them.
//!
//! What it guarantees:
//!
//! * **Statements beyond the lanes wait in the process, where they
//!   combine.** Reads, claims and publishes that queue for a lane go as one
//!   statement once one is free (see `combine`), instead of each taking a
//!   server process of its own; a server whose cores are busy runs fewer,
//!   larger statements on fewer sessions.
//! * **A lane keeps its connection while it is busy.** A connection whose
//!   statement succeeded goes back to the lanes, not to the pool, and the
//!   next statement in a lane takes it as it is: the pool would test it
//!   with a round trip when it comes back and again when it goes out
//!   (sqlx's liveness pings), which costs the server as much as the
//!   statement itself. A connection kept unused for more than a
//!   millisecond is tested (pinged) before it is used again, so a session
//!   the server ended meanwhile is discarded rather than failing a
//!   statement; one kept unused for [`KEPT_IDLE`] goes back to the pool,
//!   so a store at rest holds none of it, and so does one the lanes have
//!   had for [`KEPT_AT_MOST`] (a minute), so the pool's rules (a
//!   connection's maximum lifetime) still apply under constant load. A statement that
//!   failed, timed out or was cancelled hands its connection to the pool
//!   (which settles or discards it), never to the lanes.
//! * **A lane travels with its connection.** A connection handed from a
//!   read to the claims that follow keeps its lane; a lane is given back
//!   when its connection is kept, returned or discarded.
//! * **A lane is never held for long.** A statement in a lane never waits
//!   for an advisory lock (claims in a lane only *try* them), for a
//!   provider, or for another lane; publishes and releases wait only for
//!   row locks, which other statements hold for one statement or one short
//!   transaction. Waiting for a lane counts against the same deadline as
//!   waiting for the connection.
//! * **A stuck lane does not stop the store.** A statement that waited
//!   [`LANE_PATIENCE`] (a second) for a lane runs on a connection of the
//!   pool outside the lanes, so a lane whose statement hangs (waiting for
//!   a row lock an outside transaction holds, or on a half-open connection
//!   until the query timeout) delays the store's reads by that much, and no
//!   more.

use std::num::NonZeroUsize;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, Postgres};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::PgStore;
use crate::Error;

/// How long the lanes keep a connection no statement uses before it goes
/// back to the pool.
const KEPT_IDLE: Duration = Duration::from_millis(100);

/// How long a statement waits for a lane before it goes past the lanes,
/// on a connection of the pool: a lane is normally free within
/// milliseconds, so only a stuck one (its statement waiting for a row lock
/// held elsewhere, or on a half-open connection until the query timeout)
/// makes the others wait this long.
const LANE_PATIENCE: Duration = Duration::from_secs(1);

/// How long the lanes keep one connection in all before they give it back
/// to the pool, even under load: the pool's own rules (its connections'
/// maximum lifetime) apply to what comes back to it.
const KEPT_AT_MOST: Duration = Duration::from_secs(60);

/// How long a kept connection may go unused and still be taken without a
/// test (a round trip): under load a lane's next statement follows within
/// microseconds, so only a lane that went quiet pays for the test.
const KEPT_UNTESTED: Duration = Duration::from_millis(1);

/// A store's lanes: their permits, and the connections they keep between
/// statements (at most one per lane).
#[derive(Debug)]
pub(super) struct Lanes {
    count: NonZeroUsize,
    permits: Arc<Semaphore>,
    kept: Mutex<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    /// Connections, since when the lanes have them, and since when they
    /// are unused, the newest last.
    idle: Vec<(PoolConnection<Postgres>, Instant, Instant)>,
    /// Whether a task returns the ones kept too long.
    sweeping: bool,
}

/// What waiting for a lane came to.
pub(super) enum Entered {
    /// A lane, and the connection it kept, if it had one fit for use.
    Lane(Lane, Option<PoolConnection<Postgres>>),
    /// No lane came free within [`LANE_PATIENCE`]: the statement runs past
    /// the lanes.
    Past,
    /// The deadline passed.
    TimedOut,
}

impl Lanes {
    pub(super) fn new(count: NonZeroUsize) -> Arc<Lanes> {
        Arc::new(Lanes {
            count,
            permits: Arc::new(Semaphore::new(count.get())),
            kept: Mutex::new(Kept::default()),
        })
    }

    /// How many lanes there are.
    pub(super) fn count(&self) -> NonZeroUsize {
        self.count
    }

    /// Whether a statement could run at once: a lane is free and the lanes
    /// keep a connection for it (another statement may take them first).
    /// A statement that would wait for the pool is better off waiting where
    /// others can combine with it.
    pub(super) fn ready(&self) -> bool {
        self.permits.available_permits() > 0 && !self.lock().idle.is_empty()
    }

    /// Waits for a lane until `deadline` at most, and takes the connection
    /// a lane kept, if any (tested first when it went unused for a while).
    pub(super) async fn enter(self: &Arc<Self>, deadline: Instant) -> Entered {
        let patience = (Instant::now() + LANE_PATIENCE).min(deadline);
        let waited =
            tokio::time::timeout_at(patience, Arc::clone(&self.permits).acquire_owned()).await;
        let permit = match waited {
            Ok(Ok(permit)) => permit,
            // Past the deadline: the statement fails as it would have
            // waiting for the pool.
            Err(_) if Instant::now() >= deadline => return Entered::TimedOut,
            // A lane is stuck (a statement waiting for a row lock someone
            // holds, a half-open connection). (The semaphore is never
            // closed.)
            Err(_) | Ok(Err(_)) => return Entered::Past,
        };
        let lane = |taken| Lane {
            lanes: Arc::clone(self),
            _permit: permit,
            taken,
        };
        let kept = self.lock().idle.pop();
        match kept {
            None => Entered::Lane(lane(Instant::now()), None),
            Some((conn, taken, since)) if since.elapsed() <= KEPT_UNTESTED => {
                Entered::Lane(lane(taken), Some(conn))
            }
            // Unused for a while: the server may have ended its session
            // meanwhile (a restart, `pg_terminate_backend`), so it is
            // tested first, as the pool would.
            Some((mut conn, taken, _)) => {
                let tested =
                    tokio::time::timeout_at(deadline, sqlx::Connection::ping(&mut *conn)).await;
                match tested {
                    Ok(Ok(())) => Entered::Lane(lane(taken), Some(conn)),
                    failed => {
                        // Discarded without the pool's own test.
                        drop(conn.detach());
                        match failed {
                            Err(_) => Entered::TimedOut,
                            Ok(_) => Entered::Lane(lane(Instant::now()), None),
                        }
                    }
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `conn` (the lanes' since `taken`) for the next statement in a
    /// lane; a task hands it to the pool if none comes within
    /// [`KEPT_IDLE`]. Outside a runtime, or kept [`KEPT_AT_MOST`] already,
    /// it goes to the pool at once.
    fn keep(self: &Arc<Self>, conn: PoolConnection<Postgres>, taken: Instant) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if taken.elapsed() >= KEPT_AT_MOST {
            return;
        }
        let mut kept = self.lock();
        kept.idle.push((conn, taken, Instant::now()));
        if !kept.sweeping {
            kept.sweeping = true;
            runtime.spawn(Arc::clone(self).sweep());
        }
    }

    /// Returns the connections kept unused for [`KEPT_IDLE`] to the pool,
    /// until none is kept.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(KEPT_IDLE).await;
            let (returned, done) = {
                let mut kept = self.lock();
                let now = Instant::now();
                let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(&mut kept.idle)
                    .into_iter()
                    .partition(|(_, _, since)| now.duration_since(*since) >= KEPT_IDLE);
                kept.idle = fresh;
                // The next keep starts another sweep.
                kept.sweeping = !kept.idle.is_empty();
                (old, !kept.sweeping)
            };
            // Outside the lock: each goes back to its pool.
            drop(returned);
            if done {
                return;
            }
        }
    }
}

/// The lane a connection occupies.
pub(super) struct Lane {
    lanes: Arc<Lanes>,
    /// Released when the connection was kept or given back.
    _permit: OwnedSemaphorePermit,
    /// Since when the lanes have the connection.
    taken: Instant,
}

/// A pooled connection, and the lane it occupies if it was taken in one.
pub(super) struct Conn {
    /// Present until dropped or detached.
    conn: Option<PoolConnection<Postgres>>,
    lane: Option<Lane>,
    /// Whether its last statement succeeded, so a lane may keep it.
    reusable: bool,
}

impl Conn {
    /// A connection of the pool, in `lane` if it has one.
    pub(super) fn new(conn: PoolConnection<Postgres>, lane: Option<Lane>) -> Self {
        Conn {
            conn: Some(conn),
            lane,
            reusable: false,
        }
    }

    /// A statement starts on it: until it [`finish`](Self::finish)es, the
    /// connection is not fit for another (a cancelled statement may have
    /// left it mid-protocol).
    pub(super) fn start(&mut self) {
        self.reusable = false;
    }

    /// Its statement finished, and succeeded when `ok`: only then may a
    /// lane keep it for the next one.
    pub(super) fn finish(&mut self, ok: bool) {
        self.reusable = ok;
    }

    /// Takes the connection out of the pool for good (it may be half-open
    /// or still busy on the server), freeing its lane.
    pub(super) fn detach(mut self) -> Option<PgConnection> {
        self.conn.take().map(PoolConnection::detach)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        match &self.lane {
            Some(lane) if self.reusable => lane.lanes.keep(conn, lane.taken),
            // To the pool, which tests it (or settles what a failed
            // statement left) before anyone else gets it.
            _ => drop(conn),
        }
        // The lane's permit is released after the connection was kept.
    }
}

impl Deref for Conn {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        self.conn.as_deref().expect("present until dropped")
    }
}

impl DerefMut for Conn {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn.as_deref_mut().expect("present until dropped")
    }
}

/// The store, for a round trip that runs in a lane: `in_conn!` and
/// `on_conn!` given `&Laned(store)` acquire through [`Laned::acquire`]
/// and otherwise use the store as it is.
pub(super) struct Laned<'a>(pub(super) &'a PgStore);

impl Laned<'_> {
    /// A connection in one of the store's lanes (the one this batch's read
    /// handed on, if any, keeps its own), waiting until `deadline` at most.
    pub(super) async fn acquire(
        &self,
        doing: &str,
        deadline: Instant,
        limit: Duration,
    ) -> Result<Conn, Error> {
        self.0.acquire_conn(doing, deadline, limit, true).await
    }
}

impl Deref for Laned<'_> {
    type Target = PgStore;

    fn deref(&self) -> &PgStore {
        self.0
    }
}
