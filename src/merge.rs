//! Provider calls that wait for the rate limiter's budget merge into one.
//!
//! Under a rate limit that binds, a call waits for its permit; calls of
//! other fills that start meanwhile join it (while it has room, up to
//! `max_batch_size` keys) instead of waiting for permits of their own. The
//! budget then buys full calls: the keys a fleet fetches per second grow
//! with the limit's tightness instead of its calls being spent on a few keys
//! each.
//!
//! What it guarantees:
//!
//! * **Nothing added where the budget is there.** A call whose permit is
//!   granted at once closes its call to joiners at once and is made with its
//!   own keys.
//! * **Each key asked once per call**, and each joiner receives exactly the
//!   keys it brought, or the call's error.
//! * **No joiner is stranded.** A merged call whose maker is cancelled
//!   before answering tells its joiners so, and each of them makes (or
//!   joins) another call.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::Error;

/// What a merged call answered, shared by its maker and its joiners.
type Answer<K, V> = Option<Arc<Result<HashMap<K, V>, Error>>>;

/// The merged call that is still waiting for its permit, if any.
pub(crate) struct Boarding<K, V> {
    open: Mutex<Option<Arc<Call<K, V>>>>,
}

impl<K, V> Default for Boarding<K, V> {
    fn default() -> Self {
        Boarding {
            open: Mutex::new(None),
        }
    }
}

/// One merged call: its keys so far, and where its answer will be.
struct Call<K, V> {
    keys: Mutex<Option<Vec<K>>>,
    answer: watch::Receiver<Answer<K, V>>,
}

/// How a chunk takes part in a merged call.
pub(crate) enum Seat<K, V> {
    /// This chunk makes the call: wait for the permit, then
    /// [`Maker::close`] it and answer with [`Maker::answer`].
    Maker(Maker<K, V>),
    /// This chunk's keys ride on another chunk's call.
    Joined(Joined<K, V>),
}

/// The chunk that makes a merged call.
pub(crate) struct Maker<K, V> {
    boarding: Arc<Boarding<K, V>>,
    call: Arc<Call<K, V>>,
    answer: watch::Sender<Answer<K, V>>,
    own: Vec<K>,
}

/// A chunk riding on another chunk's call.
pub(crate) struct Joined<K, V> {
    answer: watch::Receiver<Answer<K, V>>,
    own: Vec<K>,
}

impl<K: Eq + Hash + Clone, V: Clone> Boarding<K, V> {
    /// Joins the open call if it has room for `chunk`, or opens one.
    pub(crate) fn board(self: &Arc<Self>, chunk: &[K], max_keys: usize) -> Seat<K, V> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(call) = open.as_ref() {
            let mut keys = call.keys.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(keys) = keys.as_mut() {
                if keys.len() + chunk.len() <= max_keys {
                    let new: Vec<K> = chunk
                        .iter()
                        .filter(|&k| !keys.contains(k))
                        .cloned()
                        .collect();
                    keys.extend(new);
                    return Seat::Joined(Joined {
                        answer: call.answer.clone(),
                        own: chunk.to_vec(),
                    });
                }
            }
        }
        let (sender, receiver) = watch::channel(None);
        let call = Arc::new(Call {
            keys: Mutex::new(Some(chunk.to_vec())),
            answer: receiver,
        });
        *open = Some(Arc::clone(&call));
        Seat::Maker(Maker {
            boarding: Arc::clone(self),
            call,
            answer: sender,
            own: chunk.to_vec(),
        })
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Maker<K, V> {
    /// Closes the call to joiners; returns every key it is to ask for (this
    /// chunk's first, each once).
    pub(crate) fn close(&mut self) -> Vec<K> {
        self.withdraw();
        self.call
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(|| self.own.clone())
    }

    /// How many chunks ride on this call besides the maker's.
    pub(crate) fn joiners(&self) -> usize {
        self.answer.receiver_count().saturating_sub(1)
    }

    /// Hands the call's answer to its joiners; returns this chunk's part.
    pub(crate) fn answer(
        self,
        answer: Result<HashMap<K, V>, Error>,
    ) -> Result<HashMap<K, V>, Error> {
        if self.joiners() == 0 {
            return answer;
        }
        let answer = Arc::new(answer);
        let mine = part(&answer, &self.own);
        let _ = self.answer.send(Some(answer));
        mine
    }
}

impl<K, V> Maker<K, V> {
    fn withdraw(&self) {
        let mut open = self.boarding.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.as_ref().is_some_and(|c| Arc::ptr_eq(c, &self.call)) {
            *open = None;
        }
    }
}

impl<K, V> Drop for Maker<K, V> {
    fn drop(&mut self) {
        // Cancelled before closing: nobody may join a call that will not be
        // made. Its joiners see the sender go and call again themselves.
        self.withdraw();
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Joined<K, V> {
    /// This chunk's part of the call's answer; `None` when the call's maker
    /// was cancelled before answering.
    pub(crate) async fn answered(mut self) -> Option<Result<HashMap<K, V>, Error>> {
        let answer = self.answer.wait_for(Option::is_some).await.ok()?.clone()?;
        Some(part(&answer, &self.own))
    }
}

fn part<K: Eq + Hash + Clone, V: Clone>(
    answer: &Result<HashMap<K, V>, Error>,
    keys: &[K],
) -> Result<HashMap<K, V>, Error> {
    match answer {
        Ok(values) => Ok(keys
            .iter()
            .filter_map(|k| values.get(k).map(|v| (k.clone(), v.clone())))
            .collect()),
        Err(err) => Err(err.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::FutureExt;

    #[test]
    fn joiners_ride_until_the_call_is_full_or_closed() {
        let boarding = Arc::new(Boarding::<u32, String>::default());
        let Seat::Maker(mut maker) = boarding.board(&[1, 2], 4) else {
            panic!("the first chunk makes the call");
        };
        let Seat::Joined(joined) = boarding.board(&[2, 3], 4) else {
            panic!("room for two more keys");
        };
        // No room for two more: a call of its own.
        let Seat::Maker(other) = boarding.board(&[5, 6], 4) else {
            panic!("full");
        };
        drop(other);
        assert_eq!(maker.close(), vec![1, 2, 3]);
        assert_eq!(maker.joiners(), 1);
        let Seat::Maker(_) = boarding.board(&[4], 4) else {
            panic!("a closed call takes nobody");
        };
        let values: HashMap<u32, String> = [1, 2, 3].map(|k| (k, k.to_string())).into();
        let mine = maker.answer(Ok(values)).unwrap();
        assert_eq!(mine.len(), 2);
        let theirs = joined.answered().now_or_never().unwrap().unwrap().unwrap();
        assert_eq!(theirs, [2, 3].map(|k| (k, k.to_string())).into());
    }

    #[test]
    fn a_cancelled_maker_strands_nobody() {
        let boarding = Arc::new(Boarding::<u32, String>::default());
        let Seat::Maker(maker) = boarding.board(&[1], 4) else {
            panic!("the first chunk makes the call");
        };
        let Seat::Joined(joined) = boarding.board(&[2], 4) else {
            panic!("room");
        };
        drop(maker);
        assert!(joined.answered().now_or_never().unwrap().is_none());
        assert!(matches!(boarding.board(&[3], 4), Seat::Maker(_)));
    }
}
