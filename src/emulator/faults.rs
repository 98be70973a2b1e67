//! Fault injection: latency, dropped connections, 503s and 429s, set by command-line flags at start
//! and changed at run time through `POST /__admin/faults` (a JSON merge patch of [`Faults`]).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::System;

/// Faults for one system or, at the top level of [`Faults`], for all of them; a system's own
/// setting wins over the global one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default, deny_unknown_fields)]
pub struct FaultSpec {
    /// Probability (0-1) that a Dataverse or MuleSoft data call answers 429 (Salesforce has no
    /// 429; its daily allowance answers 403).
    #[arg(long, value_parser = probability)]
    pub rate_429: Option<f64>,
    /// Probability (0-1) that a data call answers 503.
    #[arg(long, value_parser = probability)]
    pub rate_503: Option<f64>,
    /// The next N Dataverse or MuleSoft data calls answer 429 (Retry-After 1 s / reset 1000 ms).
    #[arg(long)]
    pub burst_429: Option<u32>,
    /// The next N data calls answer 503.
    #[arg(long)]
    pub burst_503: Option<u32>,
    /// Delay added to every data call, in milliseconds.
    #[arg(long)]
    pub latency_ms: Option<u64>,
    /// Probability (0-1) that a data call's connection is closed without any response.
    #[arg(long, value_parser = probability)]
    pub drop_rate: Option<f64>,
}

/// Every fault setting; `GET /__admin/faults` shows it with the bursts still to come.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(default)]
pub struct Faults {
    /// Settings for every system.
    #[serde(flatten)]
    #[command(flatten)]
    pub all: FaultSpec,
    /// Salesforce only.
    #[arg(skip)]
    pub salesforce: FaultSpec,
    /// Dataverse only.
    #[arg(skip)]
    pub dataverse: FaultSpec,
    /// MuleSoft only.
    #[arg(skip)]
    pub mulesoft: FaultSpec,
    /// Salesforce daily API allowance, overriding the config file's `daily_api_limit`.
    #[arg(long)]
    pub sf_daily_limit: Option<u64>,
    /// Token lifetime in seconds for every system, overriding the config file (applies to
    /// tokens already issued too).
    #[arg(long)]
    pub token_lifetime_secs: Option<u64>,
    /// Seed of the fault dice, for reproducible runs.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// What a data call gets instead of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Injected {
    /// Close the connection without a response.
    Drop,
    /// 503 Service Unavailable.
    Unavailable,
    /// 429 Too Many Requests, retry after one second.
    TooMany,
}

impl Injected {
    /// Name used in the stats.
    pub fn name(self) -> &'static str {
        match self {
            Injected::Drop => "drop",
            Injected::Unavailable => "503",
            Injected::TooMany => "429",
        }
    }
}

/// The settings and the dice.
pub struct FaultState {
    faults: Faults,
    rng: StdRng,
}

impl FaultState {
    /// Start with these settings.
    pub fn new(faults: Faults) -> Self {
        let rng = seeded(faults.seed);
        Self { faults, rng }
    }

    /// The current settings.
    pub fn get(&self) -> &Faults {
        &self.faults
    }

    /// Apply a JSON merge patch (RFC 7396: a key set to null goes back to off); unknown keys are
    /// refused so a typo never silently does nothing. A new `seed` re-seeds the dice.
    pub fn patch(&mut self, patch: &Value) -> Result<(), String> {
        let mut merged = serde_json::to_value(&self.faults).map_err(|e| e.to_string())?;
        merge(&mut merged, patch);
        let template = serde_json::to_value(Faults::default()).map_err(|e| e.to_string())?;
        check_keys(&merged, &template, "")?;
        let faults: Faults = serde_json::from_value(merged).map_err(|e| e.to_string())?;
        for spec in [
            &faults.all,
            &faults.salesforce,
            &faults.dataverse,
            &faults.mulesoft,
        ] {
            for p in [spec.rate_429, spec.rate_503, spec.drop_rate]
                .into_iter()
                .flatten()
            {
                probability(&p.to_string())?;
            }
        }
        if faults.seed != self.faults.seed {
            self.rng = seeded(faults.seed);
        }
        self.faults = faults;
        Ok(())
    }

    /// Roll the dice for one data call: the latency to add and the fault, if any. Bursts are
    /// used up first; Salesforce never gets a 429.
    pub fn roll(&mut self, system: System) -> (Duration, Option<Injected>) {
        let f = &mut self.faults;
        let (own, all) = match system {
            System::Salesforce => (&mut f.salesforce, &mut f.all),
            System::Dataverse => (&mut f.dataverse, &mut f.all),
            System::Mulesoft => (&mut f.mulesoft, &mut f.all),
        };
        let latency = Duration::from_millis(own.latency_ms.or(all.latency_ms).unwrap_or(0));
        let too_many = system != System::Salesforce;
        let chance = |rng: &mut StdRng, p: Option<f64>| p.is_some_and(|p| rng.random_bool(p));
        let fault = if chance(&mut self.rng, own.drop_rate.or(all.drop_rate)) {
            Some(Injected::Drop)
        } else if take(&mut own.burst_503, &mut all.burst_503) {
            Some(Injected::Unavailable)
        } else if too_many && take(&mut own.burst_429, &mut all.burst_429) {
            Some(Injected::TooMany)
        } else if chance(&mut self.rng, own.rate_503.or(all.rate_503)) {
            Some(Injected::Unavailable)
        } else if too_many && chance(&mut self.rng, own.rate_429.or(all.rate_429)) {
            Some(Injected::TooMany)
        } else {
            None
        };
        (latency, fault)
    }
}

/// Use up one call of a burst, the system's own first.
fn take(own: &mut Option<u32>, all: &mut Option<u32>) -> bool {
    for burst in [own, all] {
        if let Some(n @ 1..) = burst {
            *n -= 1;
            return true;
        }
    }
    false
}

fn seeded(seed: Option<u64>) -> StdRng {
    StdRng::seed_from_u64(seed.unwrap_or_else(rand::random))
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                match t.get_mut(k) {
                    Some(slot) if v.is_object() => merge(slot, v),
                    _ => {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn check_keys(value: &Value, template: &Value, at: &str) -> Result<(), String> {
    let (Value::Object(v), Value::Object(t)) = (value, template) else {
        return Ok(());
    };
    for (k, inner) in v {
        let known = t.get(k).ok_or_else(|| {
            format!(
                "unknown fault setting '{at}{k}'; known: {:?}",
                t.keys().collect::<Vec<_>>()
            )
        })?;
        check_keys(inner, known, &format!("{at}{k}."))?;
    }
    Ok(())
}

/// Parse a probability flag (0.0 to 1.0).
fn probability(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("'{s}' is not a probability between 0 and 1")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn patch_merges_and_refuses_typos() {
        let mut s = FaultState::new(Faults {
            seed: Some(1),
            ..Faults::default()
        });
        s.patch(&json!({"latency_ms": 5, "dataverse": {"burst_429": 2}}))
            .unwrap();
        s.patch(&json!({"rate_503": 0.5})).unwrap();
        assert_eq!(s.get().all.latency_ms, Some(5));
        assert_eq!(s.get().dataverse.burst_429, Some(2));
        s.patch(&json!({"latency_ms": null})).unwrap();
        assert_eq!(s.get().all.latency_ms, None);
        assert!(
            s.patch(&json!({"rate429": 1}))
                .unwrap_err()
                .contains("rate429")
        );
        assert!(
            s.patch(&json!({"mulesoft": {"bogus": 1}}))
                .unwrap_err()
                .contains("mulesoft.bogus")
        );
        assert!(s.patch(&json!({"drop_rate": 2.0})).is_err());
    }

    #[test]
    fn bursts_are_used_up_and_salesforce_gets_no_429() {
        let mut s = FaultState::new(Faults::default());
        s.patch(&json!({"burst_429": 1, "salesforce": {"burst_503": 1}}))
            .unwrap();
        assert_eq!(s.roll(System::Salesforce).1, Some(Injected::Unavailable));
        assert_eq!(s.roll(System::Salesforce).1, None);
        assert_eq!(s.roll(System::Mulesoft).1, Some(Injected::TooMany));
        assert_eq!(s.roll(System::Dataverse).1, None);
        assert_eq!(s.get().all.burst_429, Some(0));
    }

    #[test]
    fn same_seed_same_dice() {
        let roll = || {
            let mut s = FaultState::new(Faults::default());
            s.patch(&json!({"seed": 7, "rate_429": 0.5})).unwrap();
            (0..32)
                .map(|_| s.roll(System::Dataverse).1.is_some())
                .collect::<Vec<_>>()
        };
        assert_eq!(roll(), roll());
    }
}
