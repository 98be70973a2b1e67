//! The emulator's schema file (`connector-config/crm-emulator.toml`): credentials, limits and the
//! objects each emulated CRM knows, so that writes are validated the way the real service would.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};

/// The whole file: one section per emulated system.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmulatorConfig {
    /// `[salesforce]`.
    pub salesforce: SalesforceConfig,
    /// `[dataverse]`.
    pub dataverse: DataverseConfig,
    /// `[mulesoft]`.
    pub mulesoft: MulesoftConfig,
}

/// `[salesforce]`: the connected app, the org's limits and its sObjects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// Connected app consumer key (`client_id`, and `iss` of JWT assertions).
    pub client_id: String,
    /// Connected app consumer secret (client credentials flow).
    pub client_secret: String,
    /// PEM public key verifying RS256 JWT bearer assertions, relative to the config file.
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    /// Usernames a JWT assertion may name as `sub`.
    #[serde(default)]
    pub jwt_users: Vec<String>,
    /// Daily API request allowance.
    #[serde(default = "default_daily_limit")]
    pub daily_api_limit: u64,
    /// How long an access token stays valid.
    #[serde(
        default = "two_hours",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub token_lifetime: Duration,
    /// The allowance starts over this long after the first call that counted; unset: only
    /// `POST /__admin/reset-limits` restores it.
    #[serde(default, with = "humantime_serde")]
    pub limit_reset_after: Option<Duration>,
    /// sObjects by API name.
    #[serde(default)]
    pub objects: BTreeMap<String, SObject>,
}

/// One sObject type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SObject {
    /// Three-character record id prefix (`003` for Contact); `a00` when unset.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Fields by API name (`Id` is implicit).
    pub fields: BTreeMap<String, SfField>,
}

/// One Salesforce field.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SfField {
    /// Field type.
    #[serde(rename = "type")]
    pub kind: SfType,
    /// Maximum length in characters for text and picklist fields.
    #[serde(default)]
    pub length: Option<usize>,
    /// An external id: usable as the upsert key.
    #[serde(default)]
    pub external_id: bool,
    /// Picklist values.
    #[serde(default)]
    pub values: Vec<String>,
    /// Restricted picklist: values outside `values` are rejected.
    #[serde(default)]
    pub restricted: bool,
}

/// Salesforce field types, named as describe reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SfType {
    /// Text.
    String,
    /// Long text area.
    Textarea,
    /// Checkbox (JSON boolean).
    Boolean,
    /// Number with decimals (JSON number).
    Double,
    /// Whole number (JSON integer).
    Int,
    /// Picklist (JSON string).
    Picklist,
    /// Date/time (ISO 8601 string).
    Datetime,
    /// Date (`YYYY-MM-DD`).
    Date,
}

impl SfField {
    /// The length limit: the configured one, else Salesforce's default for the type.
    pub fn max_len(&self) -> Option<usize> {
        self.length.or(match self.kind {
            SfType::String | SfType::Picklist => Some(255),
            SfType::Textarea => Some(131_072),
            _ => None,
        })
    }
}

/// `[dataverse]`: the Entra ID app registration, service protection and the entities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataverseConfig {
    /// Tenant id or domain in the token URL.
    pub tenant: String,
    /// Application (client) id.
    pub client_id: String,
    /// Client secret value.
    pub client_secret: String,
    /// How long an access token stays valid.
    #[serde(
        default = "one_hour",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub token_lifetime: Duration,
    /// Service protection limit: requests per sliding window; a `$batch` and a bulk message
    /// (`UpsertMultiple`, `CreateMultiple`) count as one request each.
    #[serde(default = "service_protection")]
    pub rate_limit: RateLimit,
    /// Entities by logical name.
    #[serde(default)]
    pub entities: BTreeMap<String, Entity>,
}

/// A request allowance per time window (sliding for Dataverse, fixed for MuleSoft, as each
/// vendor counts).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests allowed per window.
    pub requests: u64,
    /// Window length.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub window: Duration,
}

/// One Dataverse table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entity {
    /// Entity set name used in URLs (`contacts`).
    pub entity_set: String,
    /// Attributes of the alternate key used for upserts (one name or a list).
    #[serde(deserialize_with = "one_or_many")]
    pub alternate_key: Vec<String>,
    /// Attributes by logical name (the primary id `<entity>id` is implicit).
    pub attributes: BTreeMap<String, DvAttribute>,
    /// Whether the table supports the bulk operation messages (`CreateMultiple`,
    /// `UpsertMultiple`): elastic and custom tables do, many standard tables do, some do not.
    #[serde(default = "yes")]
    pub bulk_messages: bool,
}

/// One Dataverse column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DvAttribute {
    /// Column type.
    #[serde(rename = "type")]
    pub kind: DvType,
    /// Maximum length in characters for text columns.
    #[serde(default)]
    pub length: Option<usize>,
    /// Choice options: label -> integer value.
    #[serde(default)]
    pub options: BTreeMap<String, i64>,
}

/// Dataverse column types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DvType {
    /// Single line of text.
    String,
    /// Multiple lines of text.
    Memo,
    /// Yes/No.
    Boolean,
    /// Whole number (32-bit).
    Integer,
    /// Decimal number.
    Decimal,
    /// Choice: the integer option value.
    Picklist,
    /// Date and time (ISO 8601 string).
    Datetime,
}

impl DvType {
    /// The metadata `AttributeType` name.
    pub fn metadata_name(self) -> &'static str {
        match self {
            DvType::String => "String",
            DvType::Memo => "Memo",
            DvType::Boolean => "Boolean",
            DvType::Integer => "Integer",
            DvType::Decimal => "Decimal",
            DvType::Picklist => "Picklist",
            DvType::Datetime => "DateTime",
        }
    }
}

impl DvAttribute {
    /// The length limit: the configured one, else Dataverse's default for the type.
    pub fn max_len(&self) -> Option<usize> {
        self.length.or(match self.kind {
            DvType::String => Some(100),
            DvType::Memo => Some(2000),
            _ => None,
        })
    }
}

/// `[mulesoft]`: the customer's API and the API Manager policies in front of it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MulesoftConfig {
    /// Which policy guards the API.
    #[serde(default)]
    pub auth: MuleAuth,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: String,
    /// Path of the sync endpoint.
    #[serde(default = "default_mule_path")]
    pub path: String,
    /// How long an access token stays valid (OAuth mode).
    #[serde(
        default = "one_hour",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub token_lifetime: Duration,
    /// Rate limiting policy; none by default.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Largest request body the API takes, in bytes, as a gateway in front of it might set;
    /// larger ones get HTTP 413. None by default.
    #[serde(default)]
    pub max_request_bytes: Option<usize>,
}

/// MuleSoft API Manager authentication policies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MuleAuth {
    /// Client ID Enforcement: `client_id`/`client_secret` headers or HTTP Basic.
    #[default]
    ClientId,
    /// OAuth 2.0 token enforcement: `Authorization: Bearer`.
    Oauth,
}

impl EmulatorConfig {
    /// Read, parse and check a schema file; relative key paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self> {
        let mut cfg: Self = crate::config::load(path)?;
        if let Some(key) = &mut cfg.salesforce.jwt_public_key {
            *key = path.parent().unwrap_or(Path::new(".")).join(&*key);
        }
        cfg.check()
            .map_err(|e| Error::user(format!("invalid emulator config {}: {e}", path.display())))?;
        Ok(cfg)
    }

    /// Consistency checks serde cannot express.
    fn check(&self) -> std::result::Result<(), String> {
        for (name, obj) in &self.salesforce.objects {
            if obj.key_prefix.len() != 3
                || !obj.key_prefix.chars().all(|c| c.is_ascii_alphanumeric())
            {
                return Err(format!(
                    "salesforce.objects.{name}.key_prefix must be 3 letters or digits"
                ));
            }
            for (field, f) in &obj.fields {
                if f.kind == SfType::Picklist && f.values.is_empty() {
                    return Err(format!(
                        "salesforce.objects.{name}.fields.{field}: a picklist needs values"
                    ));
                }
                if f.external_id && f.kind != SfType::String {
                    return Err(format!(
                        "salesforce.objects.{name}.fields.{field}: external ids must be strings"
                    ));
                }
            }
        }
        for (name, e) in &self.dataverse.entities {
            if e.alternate_key.is_empty() {
                return Err(format!("dataverse.entities.{name}.alternate_key is empty"));
            }
            for key in &e.alternate_key {
                match e.attributes.get(key).map(|a| a.kind) {
                    Some(DvType::String | DvType::Integer) => {}
                    _ => {
                        return Err(format!(
                            "dataverse.entities.{name}.alternate_key: '{key}' must be a string or integer attribute"
                        ));
                    }
                }
            }
            for (attr, a) in &e.attributes {
                if a.kind == DvType::Picklist && a.options.is_empty() {
                    return Err(format!(
                        "dataverse.entities.{name}.attributes.{attr}: a picklist needs options"
                    ));
                }
            }
        }
        let path = &self.mulesoft.path;
        let reserved = ["/services/", "/api/data/", "/__admin/", "/mulesoft/"];
        let clean = path.starts_with('/')
            && path.len() > 1
            && !path.ends_with('/')
            && !path.contains(['{', '}', '*', '?']);
        if !clean || reserved.iter().any(|r| path.starts_with(r)) {
            return Err(format!(
                "mulesoft.path '{path}' must be a plain path: start with '/', not end with '/', no {{ }} * ?, not under {reserved:?}"
            ));
        }
        Ok(())
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn default_daily_limit() -> u64 {
    15_000
}
fn default_key_prefix() -> String {
    "a00".into()
}
fn default_mule_path() -> String {
    "/api/trusst-crm-sync".into()
}
fn yes() -> bool {
    true
}
fn one_hour() -> Duration {
    Duration::from_secs(3600)
}
fn two_hours() -> Duration {
    Duration::from_secs(7200)
}
fn service_protection() -> RateLimit {
    RateLimit {
        requests: 6000,
        window: Duration::from_secs(300),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_config_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("connector-config/crm-emulator.toml");
        let cfg = EmulatorConfig::load(&path).unwrap();
        let contact = &cfg.salesforce.objects["Contact"];
        assert!(contact.fields["Trusst_Contact_ID__c"].external_id);
        assert_eq!(contact.fields["Call_Summary__c"].max_len(), Some(131_072));
        assert_eq!(
            cfg.dataverse.entities["contact"].alternate_key,
            ["trusst_contact_id"]
        );
        assert!(cfg.salesforce.jwt_public_key.unwrap().exists());
    }

    #[test]
    fn bad_schema_is_refused() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("connector-config/crm-emulator.toml"),
        )
        .unwrap();
        let bad = text.replace(
            r#"alternate_key = "trusst_contact_id""#,
            r#"alternate_key = "call_outcome""#,
        );
        let cfg: EmulatorConfig = crate::config::parse(&bad).unwrap();
        assert!(cfg.check().unwrap_err().contains("alternate_key"));
    }
}
