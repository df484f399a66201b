//! Reads, claims and publishes of concurrent batches and fills, combined
//! into one statement.
//!
//! Most of what a statement costs is fixed: a round trip, a function call,
//! the executor's start-up; each key adds little. Under load batches and
//! fills queue for connections anyway, so those of a namespace that queue
//! together go as one statement: the first to ask opens a group and
//! starts its runner; whoever asks while the runner waits for a connection
//! joins the group (while it has room: see below); once the runner has its
//! connection it closes the group and runs it. A read that finds a lane
//! free with a connection kept for it, and no group of its namespace open,
//! runs alone at once, in its caller's task: there is nothing to combine
//! with or wait for, and a runner would only add a hand-over each way.
//!
//! What it guarantees:
//!
//! * **Every member is answered**, with its own keys' answers or with the
//!   statement's error; a runner that cannot get a connection fails its
//!   members with that error, and a runner dropped with its runtime drops
//!   their answers, which they see as [`Error::Closed`].
//! * **A combined statement never waits for another's lock** in a way one
//!   member alone would not: a combined claim only *tries* locks (a key
//!   whose lock is busy is left to its fill, which tries again and in the
//!   end waits for it with a claim of its own), and a
//!   combined publish locks only rows its members' leases hold, in key
//!   order.
//! * **Failures stay where they belong**: a request with a key or value the
//!   database cannot store (a NUL character) never joins a group; it runs
//!   alone and fails alone.
//! * **A combined read changes nothing a member sees**: it is one statement
//!   without locks, as each member's own read would have been, begun after
//!   every member asked.
//! * **A combined claim locks no more keys than one claim may**: a group
//!   takes members up to a number of keys (for claims, the store's
//!   `max_locks_per_transaction`); whoever comes after opens the next
//!   group, which runs after it. Reads and publishes take no advisory lock
//!   and have no such bound.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::oneshot;

use crate::Error;

/// One request of a group, and where its answer goes.
pub(super) struct Member<R, A> {
    pub(super) request: R,
    answer: oneshot::Sender<Result<A, Error>>,
}

impl<R, A> Member<R, A> {
    /// Answers this member (a member that stopped waiting is skipped).
    pub(super) fn answer(self, answer: Result<A, Error>) {
        let _ = self.answer.send(answer);
    }
}

/// An open group: its number, its members, and how many keys they bring.
struct Open<R, A> {
    number: u64,
    members: Vec<Member<R, A>>,
    keys: usize,
}

/// The open groups of one kind of statement, by `K` (what a statement has
/// in common: the namespace, and for a publish its times to live).
pub(super) struct Groups<K, R, A> {
    /// Per key, the open groups, oldest first: each waits for a connection
    /// (its runner's), and only the newest takes members. A key has an
    /// entry only while it has an open group.
    open: Mutex<HashMap<K, VecDeque<Open<R, A>>>>,
    /// The number of the next group opened.
    next: std::sync::atomic::AtomicU64,
    /// The most keys a group takes: a request that would bring the newest
    /// group past this opens the next group instead (a request of more
    /// keys than this forms a group of its own).
    max_keys: usize,
}

/// What joining a group asks of the caller.
pub(super) struct Joined<A> {
    /// The caller opened the group (this one): it must start the group's
    /// runner, which [`close`](Groups::close)s it by this number, and
    /// [`abandon`](Groups::abandon) it if the runner never runs.
    pub(super) leads: Option<u64>,
    /// The caller's answer.
    pub(super) answer: oneshot::Receiver<Result<A, Error>>,
}

impl<K: Eq + Hash + Clone, R, A> Groups<K, R, A> {
    /// Groups of at most `max_keys` keys each (a request of more keys
    /// forms a group of its own).
    pub(super) fn new(max_keys: usize) -> Self {
        Groups {
            open: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
            max_keys: max_keys.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, VecDeque<Open<R, A>>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `request`, of `keys` keys, to the newest open group of `key`,
    /// or opens a group when there is none or it has no room left.
    pub(super) fn join(&self, key: &K, request: R, keys: usize) -> Joined<A> {
        let (answer, receiver) = oneshot::channel();
        let member = Member { request, answer };
        let mut open = self.lock();
        // The key is cloned only to open its first group.
        let newest = open.get_mut(key).and_then(VecDeque::back_mut);
        let leads = match newest {
            Some(group) if group.keys.saturating_add(keys) <= self.max_keys => {
                group.members.push(member);
                group.keys += keys;
                None
            }
            _ => {
                let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let group = Open {
                    number,
                    members: vec![member],
                    keys,
                };
                match open.get_mut(key) {
                    Some(queue) => queue.push_back(group),
                    None => {
                        open.insert(key.clone(), VecDeque::from([group]));
                    }
                }
                Some(number)
            }
        };
        Joined {
            leads,
            answer: receiver,
        }
    }

    /// Whether a group of `key` is open (its runner waits for a
    /// connection).
    pub(super) fn is_open(&self, key: &K) -> bool {
        self.lock().contains_key(key)
    }

    /// Takes group `number` of `key` out of the open ones, with its
    /// members: whoever asks from now on joins another group. Empty when
    /// it was taken already.
    pub(super) fn close(&self, key: &K, number: u64) -> Vec<Member<R, A>> {
        let mut open = self.lock();
        let Some(queue) = open.get_mut(key) else {
            return Vec::new();
        };
        let members = queue
            .iter()
            .position(|group| group.number == number)
            .and_then(|at| queue.remove(at))
            .map(|group| group.members)
            .unwrap_or_default();
        if queue.is_empty() {
            open.remove(key);
        }
        members
    }

    /// Fails the members of group `number` of `key` with [`Error::Closed`]
    /// if it is still open: its runner was dropped (its runtime shut down)
    /// before it took the group, and nobody else would answer them.
    pub(super) fn abandon(&self, key: &K, number: u64) {
        for member in self.close(key, number) {
            member.answer(Err(Error::Closed));
        }
    }
}

/// Calls `abandon` when dropped before [`defuse`](OnDrop::defuse): a
/// group's runner task holds one, so a task dropped before it ran still
/// answers the group.
pub(super) struct OnDrop<F: FnOnce()>(Option<F>);

impl<F: FnOnce()> OnDrop<F> {
    pub(super) fn new(abandon: F) -> Self {
        OnDrop(Some(abandon))
    }

    pub(super) fn defuse(mut self) {
        self.0 = None;
    }
}

impl<F: FnOnce()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        if let Some(abandon) = self.0.take() {
            abandon();
        }
    }
}

/// Starts a group's runner on a task of its own. A task dropped before the
/// runner finished (its runtime shut down) calls `abandon`, which answers
/// the group, so no member waits forever.
pub(super) fn spawn_runner(
    abandon: impl FnOnce() + Send + 'static,
    runner: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let abandon = OnDrop::new(abandon);
    tokio::spawn(async move {
        runner.await;
        abandon.defuse();
    });
}

/// A member of a group of its own (a request that runs alone), and its
/// answer.
pub(super) fn member<R, A>(request: R) -> (Member<R, A>, oneshot::Receiver<Result<A, Error>>) {
    let (answer, receiver) = oneshot::channel();
    (Member { request, answer }, receiver)
}

/// Waits for a member's answer; a runner that went away (its runtime shut
/// down) is [`Error::Closed`].
pub(super) async fn answered<A>(answer: oneshot::Receiver<Result<A, Error>>) -> Result<A, Error> {
    answer.await.unwrap_or(Err(Error::Closed))
}

/// Whether texts can travel in a statement with others: the database's
/// `text` holds no NUL character, so one would fail the whole statement.
pub(super) fn storable<'a>(texts: impl IntoIterator<Item = &'a str>) -> bool {
    texts.into_iter().all(|text| !text.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_to_ask_leads_and_closing_opens_the_next_group() {
        let groups: Groups<&str, u32, u32> = Groups::new(100);
        let first = groups.join(&"ns", 1, 1);
        let second = groups.join(&"ns", 2, 1);
        let other = groups.join(&"other", 3, 1);
        assert!(first.leads.is_some() && second.leads.is_none() && other.leads.is_some());
        let members = groups.close(&"ns", first.leads.unwrap());
        assert_eq!(
            members.iter().map(|m| m.request).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(
            groups.join(&"ns", 4, 1).leads.is_some(),
            "a closed group takes no one"
        );
        for member in members {
            let request = member.request;
            member.answer(Ok(request * 10));
        }
        let mut first = first.answer;
        assert_eq!(first.try_recv().unwrap().unwrap(), 10);
    }

    #[test]
    fn a_full_group_leaves_the_next_requests_to_a_new_one() {
        let groups: Groups<&str, u32, u32> = Groups::new(10);
        let first = groups.join(&"ns", 1, 6);
        let second = groups.join(&"ns", 2, 4);
        // Past the cap: the next group, which a request larger than the cap
        // does not join either.
        let third = groups.join(&"ns", 3, 1);
        let big = groups.join(&"ns", 4, 50);
        let fifth = groups.join(&"ns", 5, 1);
        assert!(first.leads.is_some() && second.leads.is_none());
        assert!(third.leads.is_some() && big.leads.is_some() && fifth.leads.is_some());
        let requests = |members: Vec<Member<u32, u32>>| -> Vec<u32> {
            members.into_iter().map(|m| m.request).collect()
        };
        // Each runner takes its own group, whatever the order.
        assert_eq!(requests(groups.close(&"ns", big.leads.unwrap())), [4]);
        assert_eq!(requests(groups.close(&"ns", first.leads.unwrap())), [1, 2]);
        assert_eq!(requests(groups.close(&"ns", third.leads.unwrap())), [3]);
        assert!(groups.is_open(&"ns"));
        assert_eq!(requests(groups.close(&"ns", fifth.leads.unwrap())), [5]);
        assert!(!groups.is_open(&"ns"));
        assert!(groups.close(&"ns", first.leads.unwrap()).is_empty());
    }

    #[tokio::test]
    async fn a_member_whose_runner_went_away_is_closed() {
        let groups: Groups<&str, u32, u32> = Groups::new(100);
        let joined = groups.join(&"ns", 1, 1);
        drop(groups.close(&"ns", joined.leads.unwrap()));
        assert!(matches!(answered(joined.answer).await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn an_abandoned_group_is_answered_and_only_that_group() {
        let groups: Groups<&str, u32, u32> = Groups::new(100);
        let first = groups.join(&"ns", 1, 1);
        let group = first.leads.unwrap();
        let guard = OnDrop::new(|| groups.abandon(&"ns", group));
        drop(guard);
        assert!(matches!(answered(first.answer).await, Err(Error::Closed)));
        // A group opened after its runner took its own is not touched.
        let second = groups.join(&"ns", 2, 1);
        groups.abandon(&"ns", group);
        let members = groups.close(&"ns", second.leads.unwrap());
        assert_eq!(members.len(), 1);
    }

    #[test]
    fn nul_characters_are_not_storable() {
        assert!(storable(["a", "b c"]));
        assert!(!storable(["a", "b\0"]));
    }
}
