//! What a failure means for the records it concerns (pure, property-tested).
//!
//! One vocabulary for the runner and every target: a target reads a CRM answer into a
//! [`Verdict`] (through [`of_status`] for what HTTP says, plus what only its API tells), carries
//! it as an [`Error`], and the runner acts on [`of_error`] of that error. So "retry", "pause",
//! "stop" and "dead-letter" mean the same thing for every CRM, and a new target cannot invent
//! a fifth.

use std::time::Duration;

use crate::error::{Error, Fault};

/// What to do with the records a failure concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send the same records again, after the wait when one is given (else with backoff):
    /// throttling, a transient fault, an answer that is not what the API promises.
    Retry(Option<Duration>),
    /// The operator must act (refused credentials, a spent allowance the CRM reports as a
    /// refusal): keep the records, mark the sink not ready, and try again after the wait.
    Pause(Option<Duration>),
    /// Every record would fail alike (a setting, a missing permission): stop the sink with the
    /// fix, committing nothing.
    Stop,
    /// These records cannot succeed as they are: dead-letter them with the reason.
    DeadLetter,
}

impl Verdict {
    /// The error that carries this verdict to the runner ([`of_error`] gives it back).
    pub fn error(self, message: impl Into<String>) -> Error {
        match self {
            Verdict::Retry(after) => wait(Error::external(message), after),
            Verdict::Pause(after) => wait(Error::user(message).retry(true), after),
            Verdict::Stop => Error::user(message),
            Verdict::DeadLetter => Error::external(message).retry(false),
        }
    }

    /// True when the records stay on the topic uncommitted for another attempt.
    pub fn keeps_records(self) -> bool {
        !matches!(self, Verdict::DeadLetter)
    }
}

fn wait(e: Error, after: Option<Duration>) -> Error {
    match after {
        Some(d) => e.after(d),
        None => e,
    }
}

/// The verdict on an error from a CRM call.
pub fn of_error(e: &Error) -> Verdict {
    match (e.retryable, e.fault) {
        (true, Fault::User) => Verdict::Pause(e.retry_after),
        (true, _) => Verdict::Retry(e.retry_after),
        (false, Fault::User) => Verdict::Stop,
        (false, _) => Verdict::DeadLetter,
    }
}

/// The verdict HTTP gives on a CRM's answer that is not a success, before the target reads
/// its body: 429, 408, 5xx and a 401 (a token that expired between calls) are retried; 403 (a
/// permission) and 407 (a proxy's credentials) fail every record alike, so the sink stops;
/// another 4xx is the request's own fault. A status that is neither a success nor an error (1xx, 3xx) is not what any of the
/// APIs promise: retried, never taken as written.
pub fn of_status(status: u16, retry_after: Option<Duration>) -> Verdict {
    match status {
        401 | 408 | 429 | 500..=599 => Verdict::Retry(retry_after),
        403 | 407 => Verdict::Stop,
        400..=499 => Verdict::DeadLetter,
        _ => Verdict::Retry(retry_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn verdict() -> impl Strategy<Value = Verdict> {
        let after = proptest::option::of((0u64..100_000).prop_map(Duration::from_millis));
        prop_oneof![
            after.clone().prop_map(Verdict::Retry),
            after.prop_map(Verdict::Pause),
            Just(Verdict::Stop),
            Just(Verdict::DeadLetter),
        ]
    }

    proptest! {
        #[test]
        fn an_error_carries_its_verdict(v in verdict(), msg in ".{0,40}") {
            let e = v.error(msg.clone());
            prop_assert_eq!(of_error(&e), v);
            prop_assert_eq!(e.message(), msg.as_str());
        }

        #[test]
        fn statuses_that_keep_records(status in 100u16..600, secs in proptest::option::of(0u64..3600)) {
            let after = secs.map(Duration::from_secs);
            let v = of_status(status, after);
            // Only a request the CRM judged on its own merits is dead-lettered.
            prop_assert_eq!(
                v == Verdict::DeadLetter,
                (400..500).contains(&status) && ![401, 403, 407, 408, 429].contains(&status)
            );
            if matches!(status, 429 | 500..=599) {
                prop_assert_eq!(v, Verdict::Retry(after));
            }
        }
    }

    #[test]
    fn every_error_kind_has_one_verdict() {
        assert_eq!(of_error(&Error::internal("bug")), Verdict::DeadLetter);
        assert_eq!(of_error(&Error::user("bad setting")), Verdict::Stop);
        assert_eq!(of_error(&Error::external("down")), Verdict::Retry(None));
        assert!(!Verdict::DeadLetter.keeps_records());
        assert!(Verdict::Stop.keeps_records());
    }
}
