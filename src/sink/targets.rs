//! The list of CRM targets: the one place a new target is registered.
//!
//! Each target lives in a folder of its own (`sink/<name>/`) with its config section, its client
//! (a [`Target`]) and its [`Profile`]: the defaults, naming rule, text limit and payload shape the
//! generic mapping applies. This file ties the three together; nothing else matches on targets.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::mapping::Conversion;
use super::{Target, dynamics, mulesoft, salesforce};
use crate::error::Result;
use crate::event::ContactEvent;

/// Which CRM a sink writes to (`[sink] target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    /// Salesforce sObjects.
    Salesforce,
    /// Dynamics 365 / Dataverse tables.
    Dynamics,
    /// A MuleSoft API taking the guide's payload.
    Mulesoft,
}

impl TargetKind {
    /// Every target, in the order `status` and the config checks take them.
    pub const ALL: [TargetKind; 3] = [
        TargetKind::Salesforce,
        TargetKind::Dynamics,
        TargetKind::Mulesoft,
    ];

    /// What the target knows about its records.
    pub fn profile(self) -> &'static Profile {
        match self {
            TargetKind::Salesforce => &salesforce::PROFILE,
            TargetKind::Dynamics => &dynamics::PROFILE,
            TargetKind::Mulesoft => &mulesoft::PROFILE,
        }
    }

    /// The name used in configs (`target = "..."`, the `[<name>]` section) and the sync audit's
    /// `crm_system` column.
    pub fn name(self) -> &'static str {
        self.profile().name
    }
}

/// A target's config section, tagged by target so a sink's target and its section cannot
/// disagree.
#[derive(Debug, Clone)]
pub enum TargetConfig {
    /// `[salesforce]`.
    Salesforce(salesforce::Config),
    /// `[dynamics]`.
    Dynamics(dynamics::Config),
    /// `[mulesoft]`.
    Mulesoft(mulesoft::Config),
}

impl TargetConfig {
    /// Which target this section configures.
    pub fn kind(&self) -> TargetKind {
        match self {
            TargetConfig::Salesforce(_) => TargetKind::Salesforce,
            TargetConfig::Dynamics(_) => TargetKind::Dynamics,
            TargetConfig::Mulesoft(_) => TargetKind::Mulesoft,
        }
    }

    /// Build the target's client.
    pub fn build(&self) -> Result<Box<dyn Target>> {
        Ok(match self {
            TargetConfig::Salesforce(c) => Box::new(salesforce::Salesforce::new(c)?),
            TargetConfig::Dynamics(c) => Box::new(dynamics::Dynamics::new(c)?),
            TargetConfig::Mulesoft(c) => Box::new(mulesoft::Mulesoft::new(c)?),
        })
    }

    /// Take endpoint overrides from the environment (they move between environments: a
    /// container network, the emulator), as the brokers do.
    pub fn endpoints_from_env(&mut self, env: impl Fn(&str) -> Option<String>) {
        match self {
            TargetConfig::Salesforce(c) => c.endpoints_from_env(env),
            TargetConfig::Dynamics(c) => c.endpoints_from_env(env),
            TargetConfig::Mulesoft(c) => c.endpoints_from_env(env),
        }
    }
}

/// A contact-level field a target maps by default: (event field, CRM field, conversion).
pub type DefaultField = (&'static str, &'static str, Option<Conversion>);

/// Builds the document a target takes instead of typed fields.
pub type Payload = fn(&ContactEvent) -> Map<String, Value>;

/// What a target knows about the records it writes; the generic mapping applies it.
#[derive(Debug)]
pub struct Profile {
    /// Config and audit name.
    pub name: &'static str,
    /// Default sObject / entity logical name / resource.
    pub object: &'static str,
    /// Default external-id field or alternate-key column.
    pub external_id_field: &'static str,
    /// Contact-level fields written by default.
    pub contact_fields: &'static [DefaultField],
    /// Whether `[mapping] field_prefix` (a Dataverse publisher prefix) applies to default names.
    pub prefixed: bool,
    /// Default longest text a field takes.
    pub text_max_length: usize,
    /// The field a question key is written to by default (the prefix is applied after).
    pub question_field: fn(&str) -> String,
    /// The conversion a question's result type gets by default; `None` for an unknown type.
    pub conversion: fn(&str) -> Option<Conversion>,
    /// Set when the target takes the event as one document instead of typed fields.
    pub payload: Option<Payload>,
    /// The field type to create in the CRM for a conversion, in the CRM's own words (`trusst-cdc
    /// questions` prints it beside each field).
    pub field_type: fn(Conversion) -> &'static str,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_named_once_and_by_its_profile() {
        let names: Vec<&str> = TargetKind::ALL.iter().map(|t| t.name()).collect();
        assert_eq!(names, ["salesforce", "dynamics", "mulesoft"]);
        for t in TargetKind::ALL {
            let parsed: TargetKind =
                serde_json::from_value(serde_json::json!(t.name())).expect("name parses");
            assert_eq!(parsed, t);
        }
    }
}
