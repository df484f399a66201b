//! Calls into the provider (tier 3): chunks of `max_batch_size` under a
//! concurrency limit, the rate limiter, a timeout per call, retries by error
//! class, panics caught, everything counted.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};

use crate::limit::{Limiter, Prepaid};
use crate::merge::{Boarding, Maker, Seat};
use crate::stats::Counters;
use crate::{BatchFetch, Error, ErrorClass, RetryPolicy};

/// How far ahead of its turn of a fleet budget a call shared by the fleet
/// is let go: the fleet's pause is read and the call closed (a round trip
/// each, the close in its store's lane) meanwhile, so that the call starts
/// at its turn rather than two round trips after. Keys that would have
/// joined it in that time go on the next call.
const CLOSE_AHEAD: Duration = Duration::from_millis(3);

/// What a provider call answered for each key it was asked (a key absent:
/// not found).
pub(crate) type Answers<K, V> = HashMap<K, Result<V, Error>>;

/// The calls of `F` open to more keys.
type MergedCalls<F> = Boarding<<F as BatchFetch>::Key, Result<<F as BatchFetch>::Value, Error>>;

/// A provider call's part in a fleet that shares calls (a store's; see
/// `PgStore`): opened to the fleet by the claim of its fill's keys, it
/// carries the keys other fills joined to it until its turn of the
/// fleet's budget.
pub(crate) trait SharedCall<K, V>: Send + Sync {
    /// The call's turn came, or the fill's keys rode on another call: no
    /// more keys join it. The keys that did, at most `room` (the rest are
    /// let go of), to ask for with the call's own; none after the fill's
    /// first call. An error when it could not be closed (or what it could
    /// not carry let go of): keys could still join it, and nothing fetched
    /// under its lease may then be published.
    fn close(&self, room: usize) -> BoxFuture<'_, Result<Vec<K>, Error>>;
    /// What the call answered for the keys `close` gave (an error: the call
    /// failed as a whole).
    fn answered(&self, answers: Result<Answers<K, V>, Error>);
}

/// The maker of a merged call (see [`crate::merge`]) of `F`'s keys.
type CallMaker<F> = Maker<<F as BatchFetch>::Key, Result<<F as BatchFetch>::Value, Error>>;

/// The provider's settings as the cache enforces them.
#[derive(Debug)]
pub(crate) struct CallPolicy {
    pub(crate) limiter: Limiter,
    pub(crate) retry: RetryPolicy,
    pub(crate) timeout: Duration,
    pub(crate) chunk_concurrency: usize,
}

/// The provider with everything the cache puts in front of it.
pub(crate) struct ProviderCaller<F: BatchFetch> {
    provider: F,
    namespace: Arc<str>,
    max_batch_size: usize,
    policy: CallPolicy,
    /// Calls waiting for the rate limiter's budget, open to more keys.
    boarding: Arc<MergedCalls<F>>,
}

/// Why one attempt failed, and what to do about it.
enum Failure {
    Retry(Error),
    RateLimited { after: Option<Duration>, err: Error },
    Fail(Error),
}

impl<F: BatchFetch> ProviderCaller<F> {
    pub(crate) fn new(provider: F, max_batch_size: usize, policy: CallPolicy) -> Self {
        let namespace = Arc::from(provider.namespace());
        ProviderCaller {
            provider,
            namespace,
            max_batch_size,
            policy,
            boarding: Arc::default(),
        }
    }

    pub(crate) fn provider(&self) -> &F {
        &self.provider
    }

    pub(crate) fn namespace(&self) -> &Arc<str> {
        &self.namespace
    }

    pub(crate) fn max_batch_size(&self) -> usize {
        self.max_batch_size
    }

    /// Pays for the first call a fill will make for `missing` keys, into
    /// `slot` (see [`crate::limit`] for when).
    pub(crate) async fn prepay(
        &self,
        missing: usize,
        slot: &Prepaid,
        counters: &Counters,
    ) -> Result<(), Error> {
        let keys = missing.min(self.max_batch_size);
        self.policy
            .limiter
            .prepay(&self.namespace, keys, slot, counters)
            .await
    }

    /// Whether calls wait for turns of a fleet-wide budget.
    #[cfg(feature = "postgres")]
    pub(crate) fn takes_fleet_turns(&self) -> bool {
        self.policy.limiter.has_fleet()
    }

    /// Whether the fleet-wide budget binds now (see
    /// [`Limiter::fleet_binds`]).
    #[cfg(feature = "postgres")]
    pub(crate) fn fleet_binds(&self) -> bool {
        self.policy.limiter.fleet_binds()
    }

    /// The longest fetching `keys` keys may take, rate-limited waits aside
    /// (a store that leases keys renews its leases across them): its calls
    /// in sequence (`chunk_concurrency` at a time), each with every attempt
    /// at the timeout and every backoff after a transient failure.
    pub(crate) fn worst_case(&self, keys: usize) -> Duration {
        self.worst_case_of(keys, Duration::ZERO)
    }

    /// [`worst_case`](Self::worst_case) with every call also waiting out
    /// rate-limited answers up to the retry policy's deadline (and making
    /// the call that ends them): what a store that holds locks across the
    /// fetch must allow for.
    pub(crate) fn worst_case_throttled(&self, keys: usize) -> Duration {
        let retry = &self.policy.retry;
        let throttled = retry
            .rate_limit_deadline()
            .checked_add(self.policy.timeout)
            .unwrap_or(Duration::MAX);
        self.worst_case_of(keys, throttled)
    }

    fn worst_case_of(&self, keys: usize, throttled: Duration) -> Duration {
        let calls = keys.div_ceil(self.max_batch_size).max(1);
        let rounds = calls.div_ceil(self.policy.chunk_concurrency.max(1));
        let retry = &self.policy.retry;
        let per_call = self
            .policy
            .timeout
            .checked_mul(retry.max_attempts().get())
            .and_then(|calls| calls.checked_add(retry.worst_case_waits()))
            .and_then(|call| call.checked_add(throttled))
            .unwrap_or(Duration::MAX);
        per_call
            .checked_mul(u32::try_from(rounds).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX)
    }

    /// Fetches `keys` in chunks of at most `max_batch_size`, at most
    /// `chunk_concurrency` at a time, in order; each key answered on its own
    /// (absent: not found). A chunk that fails as a whole fails its keys and
    /// stops the chunks not yet started (their keys fail with its error);
    /// the error alone when no key was answered.
    pub(crate) async fn call(
        &self,
        keys: &[F::Key],
        prepaid: &Prepaid,
        counters: &Counters,
        sharing: Option<&dyn SharedCall<F::Key, F::Value>>,
    ) -> Result<Answers<F::Key, F::Value>, Error> {
        // Collected first: a stream of futures built by a closure trips the
        // compiler's `Send` inference in async traits.
        let calls: Vec<_> = keys
            .chunks(self.max_batch_size)
            .map(|chunk| self.call_chunk(chunk, prepaid, counters, sharing))
            .collect();
        let mut results = futures::stream::iter(calls).buffered(self.policy.chunk_concurrency);
        let mut all = HashMap::with_capacity(keys.len());
        while let Some(answers) = results.next().await {
            match answers {
                Ok(answers) => all.extend(answers),
                Err(err) if all.is_empty() => return Err(err),
                Err(err) => {
                    for key in keys {
                        if !all.contains_key(key) {
                            all.insert(key.clone(), Err(err.clone()));
                        }
                    }
                    break;
                }
            }
        }
        Ok(all)
    }

    /// One chunk: under a rate limit, rides on a call that waits for its
    /// permit if one has room (see [`crate::merge`]), or makes one.
    async fn call_chunk(
        &self,
        chunk: &[F::Key],
        prepaid: &Prepaid,
        counters: &Counters,
        sharing: Option<&dyn SharedCall<F::Key, F::Value>>,
    ) -> Result<Answers<F::Key, F::Value>, Error> {
        if self.policy.limiter.is_unlimited() || prepaid.covers(chunk.len()) {
            if let Some(sharing) = sharing {
                sharing.close(0).await?;
            }
            return self.make_call(chunk, None, prepaid, counters, None).await;
        }
        loop {
            match self.boarding.board(chunk, self.max_batch_size) {
                Seat::Joined(joined) => {
                    if let Some(answer) = joined.answered().await {
                        // Its keys rode on another call. Its own shared
                        // call is closed before the fill publishes,
                        // carrying nothing (what joined is let go of): a
                        // key of the fill's that an invalidation revoked
                        // while that call fetched, and that a claim joined
                        // to its still-open call again, is leased to its
                        // token once more; let go of here, the value
                        // fetched before the invalidation is not published
                        // under it.
                        if let Some(sharing) = sharing {
                            sharing.close(0).await?;
                        }
                        return answer;
                    }
                    // Its maker was cancelled: another call.
                }
                Seat::Maker(maker) => {
                    return self
                        .make_call(chunk, Some(maker), prepaid, counters, sharing)
                        .await;
                }
            }
        }
    }

    /// One call: limiter, call, and retries as the error's class says; with
    /// `maker`, for every key that joined it while it waited for its permit
    /// too; with `sharing` as well, for the keys of other fills it carried
    /// (answered to `sharing`, not here).
    async fn make_call(
        &self,
        chunk: &[F::Key],
        mut maker: Option<CallMaker<F>>,
        prepaid: &Prepaid,
        counters: &Counters,
        sharing: Option<&dyn SharedCall<F::Key, F::Value>>,
    ) -> Result<Answers<F::Key, F::Value>, Error> {
        let sharing = sharing.filter(|_| maker.is_some());
        let mut carried = Vec::new();
        let mut answer = self
            .call_keys(chunk, &mut maker, prepaid, counters, sharing, &mut carried)
            .await;
        if let (Some(sharing), false) = (sharing, carried.is_empty()) {
            sharing.answered(match &mut answer {
                // A key this call also asked for in this process (its lease
                // was revoked and given to the call meanwhile) is answered
                // both ways; the others are the sharing's alone.
                Ok(answers) => Ok(carried
                    .iter()
                    .filter_map(|(key, asked_here)| match asked_here {
                        true => answers.get(key).map(|answer| (key.clone(), answer.clone())),
                        false => answers.remove_entry(key),
                    })
                    .collect()),
                Err(err) => Err(err.clone()),
            });
        }
        match maker {
            Some(maker) => maker.answer(answer),
            None => answer,
        }
    }

    async fn call_keys(
        &self,
        chunk: &[F::Key],
        maker: &mut Option<CallMaker<F>>,
        prepaid: &Prepaid,
        counters: &Counters,
        sharing: Option<&dyn SharedCall<F::Key, F::Value>>,
        carried: &mut Vec<(F::Key, bool)>,
    ) -> Result<Answers<F::Key, F::Value>, Error> {
        let policy = &self.policy;
        let mut backoff = policy.retry.backoff();
        let mut attempt = 1;
        // When the first rate-limited answer of this call came.
        let mut throttled_since: Option<tokio::time::Instant> = None;
        // The keys this call asks for: the chunk, then (once permitted)
        // every key that joined it, then only the keys that failed alone
        // with a retryable error.
        let mut asked: Vec<F::Key> = chunk.to_vec();
        let mut closed = maker.is_none();
        let mut done: Answers<F::Key, F::Value> = HashMap::with_capacity(chunk.len());
        loop {
            // A call shared by the fleet is closed with a round trip: it
            // is let go that much ahead of its turn to make it meanwhile.
            let ahead = match (sharing, closed) {
                (Some(_), false) => CLOSE_AHEAD,
                _ => Duration::ZERO,
            };
            let turn = policy
                .limiter
                .before_call(&self.namespace, asked.len(), prepaid, counters, ahead)
                .await?;
            if let (Some(maker), false) = (maker.as_mut(), closed) {
                // Permitted: no more joiners. Keys that joined while it
                // waited are charged to a keys quota now, with those other
                // fills of the fleet joined to it, as many as it has room
                // for.
                let mut all = maker.close();
                if let Some(sharing) = sharing {
                    let room = self.max_batch_size.saturating_sub(all.len());
                    let joined = sharing.close(room).await?;
                    Counters::add(&counters.carried_keys, joined.len());
                    for key in joined {
                        let asked_here = all.contains(&key);
                        if !asked_here {
                            all.push(key.clone());
                        }
                        carried.push((key, asked_here));
                    }
                }
                if all.len() > asked.len() {
                    policy
                        .limiter
                        .charge_keys(&self.namespace, all.len() - asked.len())
                        .await?;
                    Counters::add(&counters.merged_calls, maker.joiners());
                }
                asked = all;
                closed = true;
            }
            tokio::time::sleep_until(turn).await;
            let failure = match self.attempt(&asked, counters).await {
                Ok(answers) => {
                    let mut again = Vec::new();
                    let mut delay = None;
                    for (key, answer) in answers {
                        match answer {
                            Ok(value) => {
                                done.insert(key, Ok(value));
                            }
                            Err(source) => {
                                let class = self.provider.classify(&source);
                                let err = Error::Provider {
                                    namespace: self.namespace.clone(),
                                    source: Arc::new(source),
                                };
                                let retry = match class {
                                    ErrorClass::Transient => Some(None),
                                    ErrorClass::RateLimited { retry_after } => {
                                        Some(retry_after.filter(|after| {
                                            *after <= policy.retry.max_retry_after()
                                        }))
                                    }
                                    _ => None,
                                };
                                match retry {
                                    Some(after) if attempt < policy.retry.max_attempts().get() => {
                                        delay = delay.max(after);
                                        again.push(key.clone());
                                        done.insert(key, Err(err));
                                    }
                                    _ => {
                                        done.insert(key, Err(err));
                                    }
                                }
                            }
                        }
                    }
                    if again.is_empty() {
                        return Ok(done);
                    }
                    // Only the keys that failed alone, once more.
                    attempt += 1;
                    let delay = delay.or_else(|| backoff.next()).unwrap_or_default();
                    Counters::add(&counters.provider_retries, 1);
                    tracing::debug!(
                        namespace = %self.namespace,
                        attempt,
                        keys = again.len(),
                        delay_ms = delay.as_millis() as u64,
                        "retrying the keys a provider call failed alone"
                    );
                    asked = again;
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(failure) => failure,
            };
            let delay = match failure {
                Failure::Fail(err) => return Self::failed(done, &asked, err),
                Failure::Retry(err) => {
                    if attempt >= policy.retry.max_attempts().get() {
                        return Self::failed(done, &asked, err);
                    }
                    attempt += 1;
                    backoff.next().unwrap_or_default()
                }
                // Not a failed attempt: waited out, within the deadline.
                Failure::RateLimited { after, err } => {
                    let delay = after.or_else(|| backoff.next()).unwrap_or_default();
                    let rate_limited = Error::RateLimited {
                        namespace: self.namespace.clone(),
                        retry_after: delay,
                    };
                    if delay > policy.retry.max_retry_after() {
                        tracing::warn!(namespace = %self.namespace, retry_after_ms = delay.as_millis() as u64,
                            "provider asked to back off longer than max_retry_after");
                        return Self::failed(done, &asked, rate_limited);
                    }
                    // Every instance pauses, also when this one gives up.
                    policy.limiter.pause_fleet(&self.namespace, delay).await?;
                    let since = *throttled_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed().saturating_add(delay) > policy.retry.rate_limit_deadline() {
                        tracing::debug!(namespace = %self.namespace, error = %err,
                            "still rate limited at the rate-limit deadline");
                        return Self::failed(done, &asked, rate_limited);
                    }
                    Counters::add(&counters.rate_limited_waits, 1);
                    delay
                }
            };
            Counters::add(&counters.provider_retries, 1);
            tracing::debug!(
                namespace = %self.namespace,
                attempt,
                delay_ms = delay.as_millis() as u64,
                "retrying provider call"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// A call that failed as a whole: the error alone when no key was
    /// answered before (by an earlier attempt), else the answers with
    /// `asked` failed.
    fn failed(
        mut done: Answers<F::Key, F::Value>,
        asked: &[F::Key],
        err: Error,
    ) -> Result<Answers<F::Key, F::Value>, Error> {
        if done.values().all(Result::is_err) {
            return Err(err);
        }
        for key in asked {
            done.insert(key.clone(), Err(err.clone()));
        }
        Ok(done)
    }

    /// One provider call, bounded by the timeout, panics caught.
    async fn attempt(
        &self,
        chunk: &[F::Key],
        counters: &Counters,
    ) -> Result<HashMap<F::Key, Result<F::Value, F::Error>>, Failure> {
        Counters::add(&counters.provider_calls, 1);
        Counters::add(&counters.provider_keys, chunk.len());
        tracing::trace!(namespace = %self.namespace, keys = chunk.len(), "provider call");
        let call = AssertUnwindSafe(self.provider.fetch_each(chunk)).catch_unwind();
        let started = tokio::time::Instant::now();
        let outcome = tokio::time::timeout(self.policy.timeout, call).await;
        counters.record_provider_call(started.elapsed());
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(_) => {
                Counters::add(&counters.provider_timeouts, 1);
                tracing::debug!(namespace = %self.namespace, "provider call timed out");
                return Err(Failure::Retry(Error::ProviderTimeout {
                    namespace: self.namespace.clone(),
                    timeout: self.policy.timeout,
                }));
            }
        };
        match outcome {
            Ok(Ok(mut values)) => {
                // Keep only what was asked for: extra keys are ignored.
                Ok(chunk
                    .iter()
                    .filter_map(|key| values.remove_entry(key))
                    .collect())
            }
            Ok(Err(source)) => {
                let class = self.provider.classify(&source);
                tracing::debug!(namespace = %self.namespace, error = %source, ?class, "provider call failed");
                let err = Error::Provider {
                    namespace: self.namespace.clone(),
                    source: Arc::new(source),
                };
                Err(match class {
                    ErrorClass::RateLimited { retry_after } => Failure::RateLimited {
                        after: retry_after,
                        err,
                    },
                    ErrorClass::Transient => Failure::Retry(err),
                    _ => Failure::Fail(err),
                })
            }
            Err(panic) => {
                let message = panic_message(&*panic);
                tracing::error!(namespace = %self.namespace, %message, "provider panicked");
                Err(Failure::Fail(Error::ProviderPanicked {
                    namespace: self.namespace.clone(),
                    message: message.into(),
                }))
            }
        }
    }
}

impl<F: BatchFetch> fmt::Debug for ProviderCaller<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderCaller")
            .field("namespace", &self.namespace)
            .field("max_batch_size", &self.max_batch_size)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}
