//! OAuth 2.0 access tokens: client credentials or the JWT bearer flow (RS256 assertion).
//!
//! Salesforce gives no refresh token and no lifetime for these flows: the client keeps the token
//! until a request answers 401 `INVALID_SESSION_ID`, then asks for a new one.

use serde::{Deserialize, Serialize};
use tracing::info;

use super::config::{Auth, Config};
use crate::error::{Error, Result};
use crate::sink::http;

/// Lifetime of a JWT assertion; Salesforce accepts at most three minutes.
pub const ASSERTION_LIFETIME_SECS: u64 = 180;

/// The grant type of the JWT bearer flow.
pub const JWT_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// An access token and the org's instance URL every data call goes to.
#[derive(Clone)]
pub struct Token {
    /// The bearer token (never logged).
    pub access_token: String,
    /// `https://<MyDomain>.my.salesforce.com`, without a trailing slash.
    pub instance_url: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("access_token", &"**")
            .field("instance_url", &self.instance_url)
            .finish()
    }
}

/// Claims of the JWT bearer assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The connected app's consumer key.
    pub iss: String,
    /// The integration user's username.
    pub sub: String,
    /// The login URL (`https://login.salesforce.com`, test.salesforce.com or My Domain).
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

/// Claims for an assertion made at `now` (seconds since the epoch).
pub fn claims(client_id: &str, username: &str, audience: &str, now: u64) -> Claims {
    Claims {
        iss: client_id.to_owned(),
        sub: username.to_owned(),
        aud: audience.to_owned(),
        exp: now + ASSERTION_LIFETIME_SECS,
    }
}

/// Sign claims with RS256.
pub fn sign(claims: &Claims, key: &jsonwebtoken::EncodingKey) -> Result<String> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
        claims,
        key,
    )
    .map_err(|e| Error::internal("signing the JWT assertion").with_source(e))
}

enum Grant {
    ClientCredentials {
        secret: String,
    },
    Jwt {
        key: jsonwebtoken::EncodingKey,
        username: String,
        audience: String,
    },
}

/// Obtains tokens for one config; secrets are resolved and the key parsed once, up front.
pub struct Authenticator {
    token_url: String,
    client_id: String,
    grant: Grant,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl Authenticator {
    /// Check the `[salesforce]` credentials are complete and usable (a user error otherwise).
    pub fn new(cfg: &Config) -> Result<Self> {
        let login = cfg.login_url.trim_end_matches('/');
        if !(login.starts_with("https://") || login.starts_with("http://")) {
            return Err(Error::user(format!(
                "[salesforce] login_url {:?} is not a URL; use https://<MyDomain>.my.salesforce.com",
                cfg.login_url
            )));
        }
        if cfg.client_id.is_empty() {
            return Err(Error::user(
                "[salesforce] client_id is empty; use the connected app's consumer key",
            ));
        }
        let grant = match cfg.auth {
            Auth::ClientCredentials => Grant::ClientCredentials {
                secret: cfg.client_secret.resolve("[salesforce] client_secret")?,
            },
            Auth::Jwt => {
                let username = cfg.username.clone().filter(|u| !u.is_empty()).ok_or_else(|| {
                    Error::user("[salesforce] auth = \"jwt\" needs username (the integration user the token acts as)")
                })?;
                let pem = cfg.private_key.resolve("[salesforce] private_key")?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                    Error::user(format!(
                        "[salesforce] private_key is not a PEM RSA private key ({e}); give the key whose certificate is uploaded to the connected app"
                    ))
                })?;
                let audience = cfg.audience.clone().unwrap_or_else(|| login.to_owned());
                Grant::Jwt {
                    key,
                    username,
                    audience,
                }
            }
        };
        Ok(Self {
            token_url: format!("{login}/services/oauth2/token"),
            client_id: cfg.client_id.clone(),
            grant,
        })
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &str {
        &self.token_url
    }

    /// The form posted to the token endpoint (holds secrets: never log it).
    pub fn form(&self, now: u64) -> Result<Vec<(&'static str, String)>> {
        Ok(match &self.grant {
            Grant::ClientCredentials { secret } => vec![
                ("grant_type", "client_credentials".to_owned()),
                ("client_id", self.client_id.clone()),
                ("client_secret", secret.clone()),
            ],
            Grant::Jwt {
                key,
                username,
                audience,
            } => {
                let assertion = sign(&claims(&self.client_id, username, audience, now), key)?;
                vec![
                    ("grant_type", JWT_GRANT.to_owned()),
                    ("assertion", assertion),
                ]
            }
        })
    }

    /// Ask for a new token. A refused request is a user error (the credentials or the connected
    /// app need fixing); 429, 5xx and transport failures are retryable.
    pub async fn fetch(&self, client: &reqwest::Client) -> Result<Token> {
        let what = "Salesforce token request";
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let resp = http::send(
            "salesforce",
            what,
            client.post(&self.token_url).form(&self.form(now)?),
        )
        .await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.text().await.map_err(|e| http::transport(what, e))?;
        if status.is_success() {
            let t: TokenResponse = serde_json::from_str(&body).map_err(|e| {
                Error::external(format!("{what}: unexpected answer from {}", self.token_url))
                    .with_source(e)
            })?;
            let instance_url = t.instance_url.trim_end_matches('/').to_owned();
            info!(instance_url = %instance_url, flow = self.flow(), "obtained a Salesforce access token");
            return Ok(Token {
                access_token: t.access_token,
                instance_url,
            });
        }
        if matches!(status.as_u16(), 400 | 401 | 403) {
            let e: OAuthError = serde_json::from_str(&body).unwrap_or_default();
            let reason = if e.error.is_empty() {
                body.chars().take(300).collect()
            } else {
                format!("{}: {}", e.error, e.error_description)
            };
            return Err(Error::user(format!(
                "Salesforce refused the token request (HTTP {status}, {reason}); {}",
                self.hint()
            )));
        }
        Err(http::status_error(what, status, &headers, &body))
    }

    fn flow(&self) -> &'static str {
        match self.grant {
            Grant::ClientCredentials { .. } => "client_credentials",
            Grant::Jwt { .. } => "jwt_bearer",
        }
    }

    fn hint(&self) -> &'static str {
        match self.grant {
            Grant::ClientCredentials { .. } => {
                "check [salesforce] login_url (your My Domain URL), client_id and client_secret, and that the connected app enables the client credentials flow with a Run As user"
            }
            Grant::Jwt { .. } => {
                "check [salesforce] client_id, username, audience and private_key (its certificate must be uploaded to the connected app), and that the user is pre-authorized for the app"
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sink::http::Secret;
    use base64::Engine;

    /// A throwaway RSA key pair as PEM (private PKCS#8, public SPKI).
    pub(crate) fn test_key_pem() -> (String, String) {
        use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
        use aws_lc_rs::signature::KeyPair as _;
        let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let private: Pkcs8V1Der = kp.as_der().unwrap();
        let public: PublicKeyX509Der = kp.public_key().as_der().unwrap();
        let pem = |label: &str, der: &[u8]| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            let lines: Vec<&str> = b64
                .as_bytes()
                .chunks(64)
                .map(|c| std::str::from_utf8(c).unwrap())
                .collect();
            format!(
                "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
                lines.join("\n")
            )
        };
        (
            pem("PRIVATE KEY", private.as_ref()),
            pem("PUBLIC KEY", public.as_ref()),
        )
    }

    pub(crate) fn config(auth: Auth) -> Config {
        let mut c: Config =
            crate::config::parse("login_url = \"https://acme.my.salesforce.com/\"\nclient_id = \"app-key\"\nclient_secret = { value = \"s3cret\" }\n")
                .unwrap();
        c.auth = auth;
        c
    }

    #[test]
    fn claims_follow_the_jwt_bearer_flow() {
        let c = claims(
            "app-key",
            "int@acme.com",
            "https://login.salesforce.com",
            1_700_000_000,
        );
        assert_eq!(
            c,
            Claims {
                iss: "app-key".into(),
                sub: "int@acme.com".into(),
                aud: "https://login.salesforce.com".into(),
                exp: 1_700_000_180
            }
        );
    }

    #[test]
    fn client_credentials_form() {
        let a = Authenticator::new(&config(Auth::ClientCredentials)).unwrap();
        assert_eq!(
            a.token_url(),
            "https://acme.my.salesforce.com/services/oauth2/token"
        );
        let f = a.form(0).unwrap();
        assert_eq!(f[0], ("grant_type", "client_credentials".to_owned()));
        assert_eq!(f[1], ("client_id", "app-key".to_owned()));
        assert_eq!(f[2], ("client_secret", "s3cret".to_owned()));
        assert!(!format!("{a:?}").contains("s3cret"));
    }

    #[test]
    fn jwt_assertion_is_signed_rs256_and_verifies() {
        let (private, public) = test_key_pem();
        let mut c = config(Auth::Jwt);
        assert!(
            Authenticator::new(&c)
                .unwrap_err()
                .message()
                .contains("needs username")
        );
        c.username = Some("int@acme.com".into());
        c.private_key = Secret {
            value: Some(private),
            ..Default::default()
        };
        let a = Authenticator::new(&c).unwrap();
        let f = a.form(1_700_000_000).unwrap();
        assert_eq!(f[0], ("grant_type", JWT_GRANT.to_owned()));
        let jwt = &f[1].1;
        let header = jsonwebtoken::decode_header(jwt).unwrap();
        assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
        v.validate_exp = false;
        v.set_audience(&["https://acme.my.salesforce.com"]);
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()).unwrap();
        let got = jsonwebtoken::decode::<Claims>(jwt, &key, &v)
            .unwrap()
            .claims;
        // Audience defaults to the login URL (without its trailing slash).
        assert_eq!(
            got,
            claims(
                "app-key",
                "int@acme.com",
                "https://acme.my.salesforce.com",
                1_700_000_000
            )
        );

        c.audience = Some("https://test.salesforce.com".into());
        let f = Authenticator::new(&c).unwrap().form(5).unwrap();
        v.set_audience(&["https://test.salesforce.com"]);
        assert_eq!(
            jsonwebtoken::decode::<Claims>(&f[1].1, &key, &v)
                .unwrap()
                .claims
                .exp,
            185
        );
    }

    #[test]
    fn bad_key_and_url_are_user_errors() {
        let mut c = config(Auth::Jwt);
        c.username = Some("u".into());
        c.private_key = Secret {
            value: Some("not a key".into()),
            ..Default::default()
        };
        let e = Authenticator::new(&c).unwrap_err();
        assert_eq!(e.fault, crate::error::Fault::User);
        assert!(e.message().contains("private_key"), "{e}");
        let mut c = config(Auth::ClientCredentials);
        c.login_url = "acme.my.salesforce.com".into();
        assert!(
            Authenticator::new(&c)
                .unwrap_err()
                .message()
                .contains("login_url")
        );
    }
}
