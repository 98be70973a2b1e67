//! Keeps a sink from writing after its partitions moved to another member of the group.
//!
//! The consumer context records every assignment and revocation in an [`Ownership`]; the runner
//! checks it before each CRM call and before each commit. A revocation waits until the CRM calls
//! in flight have finished (a rebalance cannot complete while a member is still in its revoke
//! callback), so the new owner never starts while this member may still land an older write.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::statistics::Statistics;

use super::ownership::Ownership;
use crate::metrics::kafka::LagContext;

/// Longest a revocation waits for the CRM calls in flight: longer than any request's timeout,
/// short enough that the group's rebalance does not time out.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Default)]
struct State {
    ownership: Ownership,
    /// CRM calls started and not finished.
    in_flight: usize,
    /// Revocations seen (for the log after a batch).
    revocations: u64,
}

/// The ownership shared by the consumer context and the runner.
#[derive(Debug, Default)]
pub struct Fence {
    state: Mutex<State>,
    idle: Condvar,
}

/// A CRM call in progress: while it lives, a revocation waits.
#[derive(Debug)]
pub struct InFlight<'f> {
    fence: &'f Fence,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.fence.lock();
        s.in_flight -= 1;
        if s.in_flight == 0 {
            self.fence.idle.notify_all();
        }
    }
}

impl Fence {
    /// A fence whose ownership follows the group.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A fence for partitions assigned by hand (dry runs): everything is always owned.
    pub fn fixed() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                ownership: Ownership::fixed(),
                ..State::default()
            }),
            idle: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The epoch a record read now from `partition` carries.
    pub fn epoch(&self, partition: i32) -> u64 {
        self.lock().ownership.epoch(partition)
    }

    /// Whether a record read from `partition` in `epoch` may be written and committed.
    pub fn holds(&self, partition: i32, epoch: u64) -> bool {
        self.lock().ownership.holds(partition, epoch)
    }

    /// How many revocations happened so far.
    pub fn revocations(&self) -> u64 {
        self.lock().revocations
    }

    /// Start a CRM call for the records `(partition, epoch)`: which of them are still owned
    /// (in order), and a guard that holds revocations back until the call is over. Checking
    /// and registering happen under one lock, so no revocation slips in between.
    pub fn begin<'f>(
        &'f self,
        records: impl IntoIterator<Item = (i32, u64)>,
    ) -> (Vec<bool>, InFlight<'f>) {
        let mut s = self.lock();
        let owned = records
            .into_iter()
            .map(|(p, e)| s.ownership.holds(p, e))
            .collect();
        s.in_flight += 1;
        (owned, InFlight { fence: self })
    }

    pub(crate) fn revoke(&self, partitions: Vec<i32>) {
        let mut s = self.lock();
        s.ownership.revoked(partitions);
        s.revocations += 1;
        // No new call starts on these partitions now; wait for those already running.
        let started = Instant::now();
        while s.in_flight > 0 {
            let left = DRAIN_LIMIT.saturating_sub(started.elapsed());
            if left.is_zero() {
                tracing::error!(
                    calls = s.in_flight,
                    "partitions revoked while CRM calls were still running after {DRAIN_LIMIT:?}; \
                     giving them up (a late answer may land after the new owner's writes)"
                );
                break;
            }
            s = wait(&self.idle, s, left);
        }
    }

    pub(crate) fn assign(&self, partitions: Vec<i32>) {
        self.lock().ownership.assigned(partitions);
    }
}

/// Wait on `cv`, letting the async runtime move its other tasks off this thread meanwhile (the
/// calls being waited for may be on it).
fn wait<'a>(
    cv: &Condvar,
    guard: MutexGuard<'a, State>,
    timeout: Duration,
) -> MutexGuard<'a, State> {
    let block = || {
        cv.wait_timeout(guard, timeout)
            .map(|(g, _)| g)
            .unwrap_or_else(|e| e.into_inner().0)
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(block)
        }
        _ => block(),
    }
}

/// The sink consumer's context: lag metrics and readiness (from [`LagContext`]) plus the fence.
pub struct SinkContext {
    lag: LagContext,
    fence: Arc<Fence>,
}

impl SinkContext {
    /// A context for the sink named `sink`, recording ownership in `fence`.
    pub fn new(sink: &str, fence: Arc<Fence>) -> Self {
        Self {
            lag: LagContext::new(sink),
            fence,
        }
    }
}

impl ClientContext for SinkContext {
    fn stats(&self, statistics: Statistics) {
        self.lag.stats(statistics);
    }
}

fn partitions(tpl: &rdkafka::TopicPartitionList) -> Vec<i32> {
    tpl.elements().iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // The list holds every partition under the eager protocol (and when the member lost
        // its assignment), only those moving under the cooperative one.
        if let Rebalance::Revoke(tpl) = rebalance {
            tracing::info!(
                partitions = ?partitions(tpl),
                "partitions revoked; records read from them are not written by this member"
            );
            self.fence.revoke(partitions(tpl));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = ?partitions(tpl), "partitions assigned");
                self.fence.assign(partitions(tpl));
            }
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "consumer group rebalance failed");
            }
            Rebalance::Revoke(_) => {}
        }
        crate::metrics::kafka::assigned(matches!(rebalance, Rebalance::Assign(_)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_waits_for_the_call_in_flight() {
        let fence = Fence::new();
        fence.assign(vec![0]);
        let e = fence.epoch(0);
        let (owned, call) = fence.begin([(0, e)]);
        assert_eq!(owned, vec![true]);
        let f = fence.clone();
        let revoker = std::thread::spawn(move || f.revoke(vec![0]));
        std::thread::sleep(Duration::from_millis(100));
        assert!(!revoker.is_finished(), "the revocation waits for the call");
        drop(call);
        revoker.join().unwrap();
        let (owned, _call) = fence.begin([(0, e)]);
        assert_eq!(owned, vec![false], "no call starts on a revoked partition");
    }
}
