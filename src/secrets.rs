//! Database credentials from AWS Secrets Manager, where the integration guide keeps them:
//! `trusst/{customer_name}/db-readonly-user`, a JSON secret with `username`, `password`, `host`,
//! `port` and `database`.
//!
//! The endpoint, region and AWS credentials come from the SDK's usual sources (`AWS_REGION`,
//! `AWS_PROFILE`, `AWS_ACCESS_KEY_ID`, an instance role, `AWS_ENDPOINT_URL[_SECRETS_MANAGER]`).
//! The password never reaches a log line, a `Debug` output or an error message.

use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use serde::Deserialize;

use crate::error::{Error, Result};

/// `[database] secret`: which secret holds the credentials.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SecretRef {
    /// Customer name; the secret is `trusst/{customer}/db-readonly-user`.
    #[serde(default)]
    pub customer: Option<String>,
    /// Full secret name or ARN, for a secret stored elsewhere (instead of `customer`).
    #[serde(default)]
    pub id: Option<String>,
    /// AWS region (e.g. `ap-southeast-2`); default: the SDK's (`AWS_REGION`, the profile).
    #[serde(default)]
    pub region: Option<String>,
}

impl SecretRef {
    /// The customer the secret belongs to: `customer`, or the `<customer>` of an `id` of the
    /// guide's form `trusst/<customer>/db-readonly-user` (a name or an ARN, whose name ends in
    /// six random characters after a `-`).
    pub fn customer_name(&self) -> Option<String> {
        if let Some(c) = &self.customer {
            return Some(c.clone());
        }
        let id = self.id.as_deref()?;
        let name = id.rsplit_once(":secret:").map_or(id, |(_, n)| n);
        let rest = name.strip_prefix("trusst/")?;
        let (customer, tail) = rest.split_once('/')?;
        (!customer.is_empty() && tail.starts_with("db-readonly-user")).then(|| customer.to_owned())
    }

    /// The secret name or ARN to read.
    pub fn secret_id(&self) -> Result<String> {
        match (&self.customer, &self.id) {
            (Some(c), None) => {
                // Secrets Manager names allow letters, digits and /_+=.@-; a '/' would change the path.
                if c.is_empty()
                    || !c
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_+=.@-".contains(&b))
                {
                    return Err(Error::user(format!(
                        "invalid [database] secret customer {c:?}: use the customer name of the secret path \
                         trusst/{{customer}}/db-readonly-user (letters, digits and _+=.@-)"
                    )));
                }
                Ok(format!("trusst/{c}/db-readonly-user"))
            }
            (None, Some(id)) if !id.is_empty() => Ok(id.clone()),
            (Some(_), Some(_)) => Err(Error::user(
                "[database] secret has both customer and id: keep customer (for trusst/{customer}/db-readonly-user) \
                 or id (any secret name or ARN)",
            )),
            _ => Err(Error::user(
                "[database] secret names no secret: set customer = \"<name>\" (for trusst/<name>/db-readonly-user) \
                 or id = \"<secret name or ARN>\"",
            )),
        }
    }
}

/// The credentials a secret holds.
#[derive(Clone, PartialEq, Eq)]
pub struct DbCredentials {
    /// Login role.
    pub username: String,
    /// Its password (redacted from `Debug`).
    pub password: String,
    /// Server host name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Database name.
    pub database: String,
}

impl std::fmt::Debug for DbCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbCredentials")
            .field("username", &self.username)
            .field("password", &"**")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .finish()
    }
}

impl DbCredentials {
    /// Parse the secret's JSON. Errors name the secret and the field, never a value: serde's own
    /// messages quote the offending value, which could be the password.
    pub fn parse(secret_id: &str, json: &str) -> Result<Self> {
        let fix = "store a JSON object with username, password, host, port and database";
        let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
            .map_err(|_| Error::user(format!("secret {secret_id} is not a JSON object: {fix}")))?;
        let text = |names: &[&str]| -> Result<String> {
            match names.iter().find_map(|n| obj.get(*n)) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
                Some(_) => Err(Error::user(format!(
                    "secret {secret_id}: field {} is not a non-empty string; {fix}",
                    names[0]
                ))),
                None => Err(Error::user(format!(
                    "secret {secret_id} has no field {}; {fix}",
                    names[0]
                ))),
            }
        };
        let port = match obj.get("port") {
            Some(serde_json::Value::Number(n)) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            None => {
                return Err(Error::user(format!(
                    "secret {secret_id} has no field port; {fix}"
                )));
            }
            Some(_) => None,
        }
        .filter(|p| *p > 0)
        .ok_or_else(|| {
            Error::user(format!(
                "secret {secret_id}: field port is not a port number (1-65535)"
            ))
        })?;
        Ok(Self {
            username: text(&["username"])?,
            password: text(&["password"])?,
            host: text(&["host"])?,
            port,
            // RDS-managed secrets call it dbname.
            database: text(&["database", "dbname"])?,
        })
    }

    /// A libpq URL for these credentials (user, password and database percent-encoded).
    pub fn url(&self) -> String {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode as enc};
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        format!(
            "postgres://{}:{}@{host}:{}/{}",
            enc(&self.username, NON_ALPHANUMERIC),
            enc(&self.password, NON_ALPHANUMERIC),
            self.port,
            enc(&self.database, NON_ALPHANUMERIC)
        )
    }
}

/// Read the credentials from AWS Secrets Manager.
pub async fn fetch(secret: &SecretRef) -> Result<DbCredentials> {
    let id = secret.secret_id()?;
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(r) = &secret.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    let sdk = loader.load().await;
    let Some(region) = sdk.region().map(|r| r.to_string()) else {
        return Err(Error::user(format!(
            "no AWS region to read secret {id} from: set [database] secret region or AWS_REGION"
        )));
    };
    let client = aws_sdk_secretsmanager::Client::new(&sdk);
    let out = client.get_secret_value().secret_id(&id).send().await.map_err(|e| {
        let at = format!("secret {id} in AWS Secrets Manager ({region})");
        match &e {
            SdkError::ServiceError(se) if se.err().is_resource_not_found_exception() => Error::user(format!(
                "{at} does not exist: create it (JSON with username, password, host, port, database) or fix \
                 [database] secret customer/id and region"
            )),
            SdkError::ServiceError(se) => {
                let code = se.err().code().unwrap_or("unknown");
                let msg = se.err().message().unwrap_or_default();
                let denied = ["AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException",
                    "ExpiredTokenException", "InvalidParameterException", "InvalidRequestException"];
                let text = format!(
                    "cannot read {at}: {code}: {msg}; check the AWS credentials and that they may call \
                     secretsmanager:GetSecretValue on it"
                );
                if denied.contains(&code) { Error::user(text) } else { Error::external(text) }
            }
            other => Error::external(format!(
                "cannot read {at}: {}; check the network, the AWS credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID, \
                 instance role) and AWS_ENDPOINT_URL if set",
                DisplayErrorContext(other)
            )),
        }
    })?;
    let Some(json) = out.secret_string() else {
        return Err(Error::user(format!(
            "secret {id} holds binary data, not text: store the credentials as a JSON SecretString"
        )));
    };
    let creds = DbCredentials::parse(&id, json)?;
    tracing::info!(secret = %id, host = %creds.host, port = creds.port, database = %creds.database,
        user = %creds.username, "database credentials read from AWS Secrets Manager");
    Ok(creds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_path_follows_the_guide() {
        let r = SecretRef {
            customer: Some("acme".into()),
            ..Default::default()
        };
        assert_eq!(r.secret_id().unwrap(), "trusst/acme/db-readonly-user");
        let e = SecretRef {
            customer: Some("a/b".into()),
            ..Default::default()
        }
        .secret_id()
        .unwrap_err();
        assert!(
            e.to_string().contains("invalid [database] secret customer"),
            "{e}"
        );
        let e = SecretRef {
            customer: Some("a".into()),
            id: Some("b".into()),
            region: None,
        }
        .secret_id()
        .unwrap_err();
        assert!(e.to_string().contains("both customer and id"), "{e}");
        assert!(SecretRef::default().secret_id().is_err());
    }

    #[test]
    fn parse_names_the_missing_field_and_never_the_password() {
        let json = r#"{"username":"ro","password":"p@ss/w:rd","host":"db.example","port":"5432","dbname":"trusst"}"#;
        let c = DbCredentials::parse("s", json).unwrap();
        assert_eq!(
            c.url(),
            "postgres://ro:p%40ss%2Fw%3Ard@db.example:5432/trusst"
        );
        assert!(!format!("{c:?}").contains("p@ss"));
        let e = DbCredentials::parse(
            "s",
            r#"{"username":"ro","password":"x","port":5432,"database":"d"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("secret s has no field host"), "{e}");
        let e = DbCredentials::parse(
            "s",
            r#"{"username":"ro","password":12345,"host":"h","port":1,"database":"d"}"#,
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("field password") && !e.to_string().contains("12345"),
            "{e}"
        );
        let e = DbCredentials::parse(
            "s",
            r#"{"username":"ro","password":"x","host":"h","port":0,"database":"d"}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("field port"), "{e}");
        assert!(
            DbCredentials::parse("s", "hunter2")
                .unwrap_err()
                .to_string()
                .contains("not a JSON object")
        );
    }
}
