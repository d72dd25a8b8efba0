//! Fan-out: the one way DKVS asks many nodes the same question.
//!
//! Every protocol round — a quorum write, a quorum read and its repair, the
//! confirmation of a read while data moves, a Paxos prepare or accept, the
//! streaming of a range from several old replicas, a tombstone's purge check
//! — has the same shape: send one request to each of a set of targets, feed
//! the replies as they arrive into a tally that knows the protocol's quorum
//! rule (they live in [`crate::quorum`] and [`crate::layout::paxos`], pure),
//! stop as soon as the tally is decided or a deadline passes, and do
//! something definite with the calls still in flight. [`FanOut`] is that
//! shape once, so a round reads as "build the request, read the verdict".
//!
//! What happens to stragglers is chosen when the fan-out is made
//! ([`Stragglers`]):
//!
//! * **Abandon** — for questions without side effects (reads, prepares,
//!   probes): the remaining calls are dropped with the fan-out.
//! * **Complete** — for writes: a write already sent may be stored whether
//!   or not anyone waits for its answer, and the replicas that did not
//!   answer in time must still get it (every live replica, not just the
//!   first W). The remaining calls run to completion on [`Background`],
//!   also when the fan-out is dropped mid-round (the request's deadline
//!   cancelled the caller). A dropped caller never turns a call in flight
//!   into "not applied": the tallies count a write that did not answer as
//!   one that may be stored.

use std::future::Future;
use std::pin::Pin;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use crate::background::Background;

/// One call of a fan-out: its target's index, and the reply.
pub type Call<R> = Pin<Box<dyn Future<Output = (usize, R)> + Send>>;

/// A protocol's rule for one round, fed reply by reply.
pub trait Tally<R> {
    /// What the round decided.
    type Verdict;
    /// Takes the reply of target `index`.
    fn record(&mut self, index: usize, reply: R);
    /// `Some` once the round is decided, whatever the calls still in
    /// flight would say.
    fn verdict(&self) -> Option<Self::Verdict>;
}

/// What happens to calls still in flight once the caller stops waiting.
#[derive(Clone)]
pub enum Stragglers {
    /// Drop them: the question has no side effects.
    Abandon,
    /// Run them to completion in the background: they are writes.
    Complete(Background),
}

/// How waiting for a tally ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended<V> {
    /// The tally decided.
    Decided(V),
    /// Every call answered and the tally is still undecided.
    Exhausted,
    /// The deadline passed first.
    DeadlinePassed,
}

/// Calls to many targets, answered in the order they come back.
pub struct FanOut<R: Send + 'static> {
    /// Calls not answered yet.
    in_flight: FuturesUnordered<Call<R>>,
    /// What happens to `in_flight` when the caller stops waiting.
    stragglers: Stragglers,
}

impl<R: Send + 'static> FanOut<R> {
    pub fn new(stragglers: Stragglers) -> Self {
        Self {
            in_flight: FuturesUnordered::new(),
            stragglers,
        }
    }

    /// Sends `call` to target `index` (it runs once the fan-out is polled).
    pub fn send(&mut self, index: usize, call: impl Future<Output = R> + Send + 'static) {
        self.in_flight
            .push(Box::pin(async move { (index, call.await) }));
    }

    /// Calls not answered yet.
    pub fn pending(&self) -> usize {
        self.in_flight.len()
    }

    /// Feeds replies to `tally` until it decides, every call answered, or
    /// `deadline` passes.
    pub async fn collect<T: Tally<R>>(
        &mut self,
        tally: &mut T,
        deadline: Option<Instant>,
    ) -> Ended<T::Verdict> {
        loop {
            if let Some(verdict) = tally.verdict() {
                return Ended::Decided(verdict);
            }
            let next = match deadline {
                None => self.in_flight.next().await,
                Some(deadline) => tokio::select! {
                    biased;
                    next = self.in_flight.next() => next,
                    () = tokio::time::sleep_until(deadline) => return Ended::DeadlinePassed,
                },
            };
            match next {
                Some((index, reply)) => tally.record(index, reply),
                None => return Ended::Exhausted,
            }
        }
    }

    /// Lets the calls still in flight finish, handing each reply to `each`
    /// (for writes: hint a replica that failed). Under
    /// [`Stragglers::Abandon`] they are dropped and `each` never runs.
    /// When the background is full the calls are waited for here: a write
    /// is slowed down, never cut short (if the caller is cancelled
    /// meanwhile, what is left still finishes, see `Drop`).
    pub async fn finish<F, Done>(mut self, each: F)
    where
        F: FnMut(usize, R) -> Done + Send + 'static,
        Done: Future<Output = ()> + Send + 'static,
    {
        if self.in_flight.is_empty() {
            return;
        }
        let Stragglers::Complete(background) = self.stragglers.clone() else {
            return;
        };
        let mut each = Some(each);
        let spawned = background.try_spawn_with(|| {
            let in_flight = std::mem::take(&mut self.in_flight);
            let mut each = each.take();
            async move {
                let mut in_flight = in_flight;
                while let Some((index, reply)) = in_flight.next().await {
                    if let Some(each) = each.as_mut() {
                        each(index, reply).await;
                    }
                }
            }
        });
        let Some(mut each) = each.filter(|_| !spawned) else {
            return;
        };
        // Drained in place: the calls stay in `self` until they answer.
        // Boxed: a rare path whose callbacks' futures would otherwise be
        // held inline in every caller's future.
        Box::pin(async move {
            while let Some((index, reply)) = self.in_flight.next().await {
                each(index, reply).await;
            }
        })
        .await;
    }

    /// The calls still in flight, to be awaited elsewhere (read repair
    /// collects a read's late replies with its own). The stragglers policy
    /// no longer applies to them.
    pub fn into_calls(mut self) -> FuturesUnordered<Call<R>> {
        std::mem::take(&mut self.in_flight)
    }
}

async fn drain<R, F, Done>(mut calls: FuturesUnordered<Call<R>>, mut each: F)
where
    F: FnMut(usize, R) -> Done,
    Done: Future<Output = ()>,
{
    while let Some((index, reply)) = calls.next().await {
        each(index, reply).await;
    }
}

impl<R: Send + 'static> Drop for FanOut<R> {
    /// A fan-out dropped with writes in flight (its caller was cancelled)
    /// lets them finish: they may already be stored somewhere.
    fn drop(&mut self) {
        if self.in_flight.is_empty() {
            return;
        }
        if let Stragglers::Complete(background) = &self.stragglers {
            let in_flight = std::mem::take(&mut self.in_flight);
            background.spawn_unbounded(drain(in_flight, |_, _| async {}));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    /// Decided once `needed` replies were `true`; lost once that is out of reach.
    struct Majority {
        needed: usize,
        targets: usize,
        yes: usize,
        no: usize,
    }

    impl Tally<bool> for Majority {
        type Verdict = bool;
        fn record(&mut self, _index: usize, reply: bool) {
            if reply { self.yes += 1 } else { self.no += 1 }
        }
        fn verdict(&self) -> Option<bool> {
            if self.yes >= self.needed {
                Some(true)
            } else if self.targets - self.no < self.needed {
                Some(false)
            } else {
                None
            }
        }
    }

    fn majority(targets: usize) -> Majority {
        Majority {
            needed: targets / 2 + 1,
            targets,
            yes: 0,
            no: 0,
        }
    }

    /// A reply of `answer` after `ms`, counting the calls that finished.
    fn after(ms: u64, answer: bool, done: &Arc<AtomicUsize>) -> impl Future<Output = bool> + use<> {
        let done = done.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            done.fetch_add(1, Ordering::SeqCst);
            answer
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_is_decided_at_the_quorum_without_waiting_for_the_slowest() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut calls = FanOut::new(Stragglers::Abandon);
        calls.send(0, after(10, true, &done));
        calls.send(1, after(20, true, &done));
        calls.send(2, after(10_000, true, &done));
        let started = Instant::now();
        let ended = calls.collect(&mut majority(3), None).await;
        assert_eq!(ended, Ended::Decided(true));
        assert_eq!(started.elapsed(), Duration::from_millis(20));
        assert_eq!(calls.pending(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_is_lost_as_soon_as_the_quorum_is_out_of_reach() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut calls = FanOut::new(Stragglers::Abandon);
        calls.send(0, after(10, false, &done));
        calls.send(1, after(20, false, &done));
        calls.send(2, after(10_000, true, &done));
        let started = Instant::now();
        assert_eq!(
            calls.collect(&mut majority(3), None).await,
            Ended::Decided(false)
        );
        assert_eq!(started.elapsed(), Duration::from_millis(20));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_ends_the_wait_and_exhaustion_is_told_apart() {
        let done = Arc::new(AtomicUsize::new(0));
        let mut calls = FanOut::new(Stragglers::Abandon);
        calls.send(0, after(10, true, &done));
        calls.send(1, after(5_000, true, &done));
        calls.send(2, after(5_000, true, &done));
        let deadline = Instant::now() + Duration::from_millis(100);
        assert_eq!(
            calls.collect(&mut majority(3), Some(deadline)).await,
            Ended::DeadlinePassed
        );
        // A tally that never decides: every call answered.
        let mut calls = FanOut::new(Stragglers::Abandon);
        calls.send(0, after(10, true, &done));
        let mut never = majority(5);
        never.targets = 100;
        never.needed = 100;
        assert_eq!(calls.collect(&mut never, None).await, Ended::Exhausted);
    }

    #[tokio::test(start_paused = true)]
    async fn write_stragglers_finish_in_the_background_and_report_their_replies() {
        let background = Background::new(CancellationToken::new());
        let done = Arc::new(AtomicUsize::new(0));
        let mut calls = FanOut::new(Stragglers::Complete(background.clone()));
        calls.send(0, after(10, true, &done));
        calls.send(1, after(10, true, &done));
        calls.send(2, after(1_000, false, &done));
        assert_eq!(
            calls.collect(&mut majority(3), None).await,
            Ended::Decided(true)
        );
        let late = Arc::new(AtomicUsize::new(0));
        let seen = late.clone();
        calls
            .finish(move |index, reply| {
                assert_eq!((index, reply), (2, false));
                seen.fetch_add(1, Ordering::SeqCst);
                async {}
            })
            .await;
        background.close(Duration::from_secs(60)).await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
        assert_eq!(late.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_fan_out_still_completes_its_writes_but_abandons_its_reads() {
        let background = Background::new(CancellationToken::new());
        let writes = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        {
            let mut calls = FanOut::new(Stragglers::Complete(background.clone()));
            calls.send(0, after(1_000, true, &writes));
            calls.send(1, after(1_000, true, &writes));
            let mut reading = FanOut::new(Stragglers::Abandon);
            reading.send(0, after(1_000, true, &reads));
            // The caller's deadline passes: both are dropped mid-round.
            let deadline = Instant::now() + Duration::from_millis(10);
            assert_eq!(
                calls.collect(&mut majority(2), Some(deadline)).await,
                Ended::DeadlinePassed
            );
        }
        background.close(Duration::from_secs(60)).await;
        assert_eq!(
            writes.load(Ordering::SeqCst),
            2,
            "writes are never cut short"
        );
        assert_eq!(reads.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_background_full_a_write_is_waited_for_and_still_finishes_if_its_caller_is_cancelled()
     {
        let background = Background::new(CancellationToken::new());
        // Fill the background with work that outlives the test's calls.
        for _ in 0..2048 {
            background.spawn(tokio::time::sleep(Duration::from_secs(3600)));
        }
        let writes = Arc::new(AtomicUsize::new(0));
        let mut calls = FanOut::new(Stragglers::Complete(background.clone()));
        calls.send(0, after(10, true, &writes));
        calls.send(1, after(1_000, true, &writes));
        calls.send(2, after(1_000, true, &writes));
        let mut first = majority(1);
        first.targets = 3;
        assert_eq!(calls.collect(&mut first, None).await, Ended::Decided(true));
        // No room: `finish` waits in place; the caller gives up meanwhile.
        let cancelled =
            tokio::time::timeout(Duration::from_millis(100), calls.finish(|_, _| async {})).await;
        assert!(cancelled.is_err(), "finish waited for the stragglers");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(writes.load(Ordering::SeqCst), 3, "never cut short");
    }
}
