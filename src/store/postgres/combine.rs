//! Reads, claims and publishes of concurrent batches and fills, combined
//! into one statement.
//!
//! Most of what a statement costs is fixed: a round trip, a function call,
//! the executor's start-up; each key adds little. Under load batches and
//! fills queue for connections anyway, so those of a namespace that queue
//! together go as one statement: the first to ask opens a group and
//! starts its runner; whoever asks while the runner waits for a connection
//! joins the group; once the runner has its connection it closes the group
//! and runs it. A read that finds a lane free with a connection kept for
//! it, and no group of its namespace open, runs alone at once, in its
//! caller's task: there is nothing to combine with or wait for, and a
//! runner would only add a hand-over each way.
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

use std::collections::HashMap;
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

/// An open group: its number and its members.
type Open<R, A> = (u64, Vec<Member<R, A>>);

/// The open groups of one kind of statement, by `K` (what a statement has
/// in common: the namespace, and for a publish its times to live).
pub(super) struct Groups<K, R, A> {
    /// Per key, the open group: its number and its members.
    open: Mutex<HashMap<K, Open<R, A>>>,
    /// The number of the next group opened.
    next: std::sync::atomic::AtomicU64,
}

/// What joining a group asks of the caller.
pub(super) struct Joined<A> {
    /// The caller opened the group (this one): it must start the group's
    /// runner, and [`abandon`](Groups::abandon) it if the runner never
    /// runs.
    pub(super) leads: Option<u64>,
    /// The caller's answer.
    pub(super) answer: oneshot::Receiver<Result<A, Error>>,
}

impl<K: Eq + Hash + Clone, R, A> Groups<K, R, A> {
    pub(super) fn new() -> Self {
        Groups {
            open: Mutex::new(HashMap::new()),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Adds `request` to the open group of `key`, opening one when there is
    /// none.
    pub(super) fn join(&self, key: &K, request: R) -> Joined<A> {
        let (answer, receiver) = oneshot::channel();
        let member = Member { request, answer };
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let leads = match open.get_mut(key) {
            Some((_, members)) => {
                members.push(member);
                None
            }
            None => {
                let group = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                open.insert(key.clone(), (group, vec![member]));
                Some(group)
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
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(key)
    }

    /// Closes the open group of `key`: whoever asks from now on opens the
    /// next one.
    pub(super) fn close(&self, key: &K) -> Vec<Member<R, A>> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key)
            .map(|(_, members)| members)
            .unwrap_or_default()
    }

    /// Fails the members of group `group` of `key` with [`Error::Closed`] if
    /// it is still open: its runner was dropped (its runtime shut down)
    /// before it took the group, and nobody else would answer them.
    pub(super) fn abandon(&self, key: &K, group: u64) {
        let members = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            match open.get(key) {
                Some((open_group, _)) if *open_group == group => open.remove(key),
                _ => None,
            }
        };
        for member in members.map(|(_, members)| members).unwrap_or_default() {
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
        let groups: Groups<&str, u32, u32> = Groups::new();
        let first = groups.join(&"ns", 1);
        let second = groups.join(&"ns", 2);
        let other = groups.join(&"other", 3);
        assert!(first.leads.is_some() && second.leads.is_none() && other.leads.is_some());
        let members = groups.close(&"ns");
        assert_eq!(
            members.iter().map(|m| m.request).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(
            groups.join(&"ns", 4).leads.is_some(),
            "a closed group takes no one"
        );
        for member in members {
            let request = member.request;
            member.answer(Ok(request * 10));
        }
        let mut first = first.answer;
        assert_eq!(first.try_recv().unwrap().unwrap(), 10);
    }

    #[tokio::test]
    async fn a_member_whose_runner_went_away_is_closed() {
        let groups: Groups<&str, u32, u32> = Groups::new();
        let joined = groups.join(&"ns", 1);
        drop(groups.close(&"ns"));
        assert!(matches!(answered(joined.answer).await, Err(Error::Closed)));
    }

    #[tokio::test]
    async fn an_abandoned_group_is_answered_and_only_that_group() {
        let groups: Groups<&str, u32, u32> = Groups::new();
        let first = groups.join(&"ns", 1);
        let group = first.leads.unwrap();
        let guard = OnDrop::new(|| groups.abandon(&"ns", group));
        drop(guard);
        assert!(matches!(answered(first.answer).await, Err(Error::Closed)));
        // A group opened after its runner took its own is not touched.
        let second = groups.join(&"ns", 2);
        groups.abandon(&"ns", group);
        let members = groups.close(&"ns");
        assert_eq!(members.len(), 1, "{:?}", second.leads);
    }

    #[test]
    fn nul_characters_are_not_storable() {
        assert!(storable(["a", "b c"]));
        assert!(!storable(["a", "b\0"]));
    }
}
