//! PostgreSQL connections: the regular client (queries) and the replication stream's config,
//! both from one libpq-style URL, with libpq's `sslmode` and `sslrootcert` for TLS.
//!
//! tokio-postgres knows only `sslmode=disable|prefer|require` and no `sslrootcert`, so both are
//! taken out of the URL here and applied to the rustls config of each connection.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationConfig, TlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use serde::Deserialize;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{Error, Result};

/// libpq's `sslmode`: how much of TLS a connection insists on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, unverified; plain otherwise (libpq's default).
    #[default]
    Prefer,
    /// TLS always; the certificate is checked only when `sslrootcert` is given (as libpq does).
    Require,
    /// TLS, and the certificate must chain to `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl FromStr for SslMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::user(format!(
                    "invalid sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
                )));
            }
        })
    }
}

/// The TLS part of a connection target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tls {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of the CA certificates the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
}

impl Tls {
    /// Whether the server's certificate is checked against `sslrootcert`.
    fn verifies(&self) -> bool {
        match self.mode {
            SslMode::VerifyCa | SslMode::VerifyFull => true,
            // libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
            SslMode::Require => self.root_cert.is_some(),
            SslMode::Disable | SslMode::Prefer => false,
        }
    }

    fn check(&self) -> Result<()> {
        if matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) && self.root_cert.is_none()
        {
            return Err(Error::user(format!(
                "sslmode={} needs sslrootcert: add sslrootcert=/path/to/ca.pem (the CA that signed the server's \
                 certificate, e.g. the Amazon RDS CA bundle) to the database URL or [database] sslrootcert",
                self.mode.as_str()
            )));
        }
        Ok(())
    }

    /// The CA certificates in `sslrootcert`.
    fn roots(&self) -> Result<rustls::RootCertStore> {
        let mut roots = rustls::RootCertStore::empty();
        let Some(path) = &self.root_cert else {
            return Ok(roots);
        };
        let unreadable = |e: String| {
            Error::user(format!(
                "sslrootcert {}: {e}; point sslrootcert at a PEM file with the CA certificate(s)",
                path.display()
            ))
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(e.to_string()))?
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| unreadable(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(unreadable("no CA certificate in the file".into()));
        }
        Ok(roots)
    }

    /// The rustls config for this mode.
    fn rustls_config(&self) -> Result<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::internal("TLS protocol versions").with_source(e))?;
        if !self.verifies() {
            return Ok(builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth());
        }
        let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.roots()?),
            provider,
        )
        .build()
        .map_err(|e| Error::internal("building the TLS certificate verifier").with_source(e))?;
        let verifier: Arc<dyn ServerCertVerifier> = match self.mode {
            SslMode::VerifyFull => webpki,
            _ => Arc::new(ChainOnly(webpki)),
        };
        Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth())
    }

    /// The error for a failed connection whose cause mentions TLS, with the setting to change.
    fn explain(&self, at: &str, cause: &str) -> Option<Error> {
        let lower = cause.to_ascii_lowercase();
        if lower.contains("server does not support tls") {
            return Some(Error::user(format!(
                "PostgreSQL at {at} does not accept TLS, but sslmode={} requires it: enable ssl on the server, \
                 or set sslmode=prefer (or disable) in the database URL or [database] sslmode",
                self.mode.as_str()
            )));
        }
        if !lower.contains("certificate") && !lower.contains("tls") {
            return None;
        }
        let root = self
            .root_cert
            .as_deref()
            .map_or("(none)".into(), |p| p.display().to_string());
        let fix = if lower.contains("notvalidforname") || lower.contains("not valid for name") {
            format!(
                "the server's certificate does not name the host in the URL: connect with a host name the \
                 certificate lists, or use sslmode=verify-ca (sslmode is {})",
                self.mode.as_str()
            )
        } else if self.verifies() {
            format!(
                "the server's certificate does not verify against sslrootcert {root} (sslmode={}): set sslrootcert \
                 to the PEM file of the CA that signed the server's certificate",
                self.mode.as_str()
            )
        } else {
            format!(
                "check the server's TLS setup (sslmode={})",
                self.mode.as_str()
            )
        };
        Some(Error::user(format!(
            "TLS handshake with PostgreSQL at {at} failed: {cause}; {fix}"
        )))
    }
}

/// Accepts any certificate: `prefer` and `require` without `sslrootcert` encrypt but, as in libpq,
/// do not authenticate the server.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must verify, whatever host name the certificate carries.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A parsed URL: what tokio-postgres understands, and the TLS settings it does not.
#[derive(Debug, Clone)]
pub struct Target {
    /// Everything but the TLS settings.
    pub config: Config,
    /// `sslmode` and `sslrootcert`.
    pub tls: Tls,
}

/// Take `sslmode` and `sslrootcert` out of a URL (`postgres://...?k=v&...`) or a key/value
/// string (`host=... sslmode=...`); the rest is left for tokio-postgres.
fn split_tls(url: &str) -> Result<(String, Tls)> {
    let mut tls = Tls::default();
    let mut take = |key: &str, value: &str| -> Result<bool> {
        match key {
            "sslmode" => tls.mode = value.parse()?,
            "sslrootcert" => tls.root_cert = Some(PathBuf::from(value)),
            _ => return Ok(false),
        }
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            None => url.to_owned(),
            Some((base, query)) => {
                let mut kept = Vec::new();
                for pair in query.split('&').filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                    let v = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
                    if !take(k, &v)? {
                        kept.push(pair);
                    }
                }
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
        }
    } else {
        let mut kept = Vec::new();
        for token in url.split_whitespace() {
            let (k, v) = token.split_once('=').unwrap_or((token, ""));
            if !take(k.trim(), v.trim().trim_matches('\''))? {
                kept.push(token);
            }
        }
        kept.join(" ")
    };
    tls.check()?;
    Ok((rest, tls))
}

/// Parse a libpq-style URL, naming the problem when it is malformed.
pub fn parse_url(url: &str) -> Result<Target> {
    let (rest, tls) = split_tls(url)?;
    let config = rest.parse::<Config>().map_err(|e| {
        Error::user(format!(
            "invalid database URL: {e}; expected postgres://user:password@host:port/database[?sslmode=...&sslrootcert=...]"
        ))
    })?;
    Ok(Target { config, tls })
}

/// What a query value keeps unencoded: enough for modes and paths to stay readable.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

/// `url` with `sslmode` and `sslrootcert` added where the URL does not set them already.
pub fn with_tls_defaults(url: &str, mode: Option<SslMode>, root_cert: Option<&Path>) -> String {
    let keyed = !(url.starts_with("postgres://") || url.starts_with("postgresql://"));
    let has = |key: &str| {
        if keyed {
            url.split_whitespace()
                .any(|t| t.starts_with(&format!("{key}=")))
        } else {
            url.split_once('?')
                .is_some_and(|(_, q)| q.split('&').any(|p| p.starts_with(&format!("{key}="))))
        }
    };
    let mut out = url.to_owned();
    let mut add = |key: &str, value: &str| {
        if keyed {
            out.push_str(&format!(" {key}='{value}'"));
        } else {
            let enc = percent_encoding::utf8_percent_encode(value, QUERY_VALUE);
            out.push(if out.contains('?') { '&' } else { '?' });
            out.push_str(&format!("{key}={enc}"));
        }
    };
    if let Some(m) = mode.filter(|_| !has("sslmode")) {
        add("sslmode", m.as_str());
    }
    if let Some(p) = root_cert.filter(|_| !has("sslrootcert")) {
        add("sslrootcert", &p.display().to_string());
    }
    out
}

/// Connect a regular client; the connection task runs in the background and logs its end.
pub async fn connect(url: &str) -> Result<Client> {
    let Target { mut config, tls } = parse_url(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    config.ssl_mode(match tls.mode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
        _ => tokio_postgres::config::SslMode::Require,
    });
    let connector = MakeRustlsConnect::new(tls.rustls_config()?);
    let (client, conn) = config.connect(connector).await.map_err(|e| {
        let hint = describe(&config);
        if let Some(db) = e.as_db_error() {
            // Starting up, shutting down or restarting (a failover, a restart): the source's
            // reconnect loop must wait it out, not stop as if the configuration were wrong.
            if server_unavailable(db.code()) {
                return Error::external(format!(
                    "PostgreSQL at {hint} is not accepting connections now: {}",
                    db.message()
                ));
            }
            return Error::user(format!("PostgreSQL at {hint} refused the connection: {}", db.message()));
        }
        if let Some(err) = tls.explain(&hint, &error_chain(&e)) {
            return err;
        }
        Error::external(format!(
            "cannot connect to PostgreSQL at {hint}; check DATABASE_URL (or [database] url or secret) and that the server is running"
        ))
        .with_source(e)
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Every message down an error's cause chain, including what an `io::Error` wraps (its
/// `source()` skips the wrapped error itself).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = Some(e);
    while let Some(err) = cur {
        let next = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
        // Wrappers often repeat their cause's text; keep each message once.
        if let Some(n) = next.map(|n| n.to_string())
            && !parts.last().is_some_and(|last| last.contains(&n))
        {
            parts.push(n);
        }
        cur = next;
    }
    parts.join(": ")
}

/// A refusal that passes with time: the server is starting, shutting down or out of connection
/// slots (SQLSTATE classes 57, operator intervention, and 53, insufficient resources).
fn server_unavailable(code: &tokio_postgres::error::SqlState) -> bool {
    code.code().starts_with("57") || code.code().starts_with("53")
}

/// The first host (or Unix socket folder) and port of a URL, with libpq's defaults.
fn host_port(config: &Config) -> (String, u16) {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    (host, config.get_ports().first().copied().unwrap_or(5432))
}

/// The URL with its host list replaced by one `host:port` (both URL and key/value forms).
pub fn with_single_host(url: &str, host: &str, port: u16) -> String {
    if let Some(rest) = url
        .strip_prefix("postgres://")
        .map(|r| ("postgres://", r))
        .or_else(|| {
            url.strip_prefix("postgresql://")
                .map(|r| ("postgresql://", r))
        })
    {
        let (scheme, rest) = rest;
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let userinfo = authority.rfind('@').map_or("", |i| &authority[..=i]);
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        return format!("{scheme}{userinfo}{host}:{port}{tail}");
    }
    let mut kept: Vec<String> = url
        .split_whitespace()
        .filter(|t| {
            !t.starts_with("host=") && !t.starts_with("port=") && !t.starts_with("hostaddr=")
        })
        .map(str::to_owned)
        .collect();
    kept.push(format!("host={host}"));
    kept.push(format!("port={port}"));
    kept.join(" ")
}

/// For a URL that lists several hosts (a primary and its standbys, the way a failover-aware
/// client is configured), the URL of the one host this session should use: the first that
/// answers and, with `target_session_attrs=read-write`, is not in recovery (the primary after a
/// promotion). A URL with one host is returned as it is. The replication protocol connects to
/// one host, so the query and replication connections of a session both use the result.
pub async fn resolve_host(url: &str) -> Result<String> {
    let Target { config, .. } = parse_url(url)?;
    let hosts = config.get_hosts();
    if hosts.len() <= 1 {
        return Ok(url.to_owned());
    }
    let ports = config.get_ports();
    let want_primary = matches!(
        config.get_target_session_attrs(),
        tokio_postgres::config::TargetSessionAttrs::ReadWrite
    );
    let mut tried = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let Host::Tcp(host) = h else { continue };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let single = with_single_host(url, host, port);
        let answer = async {
            let c = connect(&single).await?;
            let r = c
                .query_one("SELECT pg_is_in_recovery()", &[])
                .await
                .map_err(|e| crate::error::pg("asking whether the server is a standby", e))?;
            Ok::<bool, Error>(r.get(0))
        };
        match tokio::time::timeout(Duration::from_secs(10), answer).await {
            Ok(Ok(in_recovery)) if !(want_primary && in_recovery) => {
                if i > 0 {
                    tracing::info!(host = %host, port, "using this host of the database URL's list");
                }
                return Ok(single);
            }
            Ok(Ok(_)) => tried.push(format!("{host}:{port} is a standby")),
            Ok(Err(e)) => tried.push(format!("{host}:{port}: {}", e.message())),
            Err(_) => tried.push(format!("{host}:{port}: no answer within 10 s")),
        }
    }
    Err(Error::external(format!(
        "no host of the database URL is {} now ({}); during a failover this passes once a standby is promoted",
        if want_primary {
            "a writable primary"
        } else {
            "reachable"
        },
        tried.join("; ")
    )))
}

/// `host:port/db` for messages (never the password).
pub fn describe(config: &Config) -> String {
    let (host, port) = host_port(config);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

/// The replication stream's config for `slot` and `publication`, from the same URL. `messages`
/// asks for logical decoding messages (the heartbeat), which pgoutput offers from PostgreSQL 14.
pub fn replication_config(
    url: &str,
    slot: &str,
    publication: &str,
    messages: bool,
) -> Result<ReplicationConfig> {
    let Target { config, tls } = parse_url(url)?;
    let (host, port) = host_port(&config);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    let mut wire_tls = TlsConfig {
        mode: match tls.mode {
            SslMode::Disable => pgwire_replication::SslMode::Disable,
            SslMode::Prefer => pgwire_replication::SslMode::Prefer,
            SslMode::Require if tls.verifies() => pgwire_replication::SslMode::VerifyCa,
            SslMode::Require => pgwire_replication::SslMode::Require,
            SslMode::VerifyCa => pgwire_replication::SslMode::VerifyCa,
            SslMode::VerifyFull => pgwire_replication::SslMode::VerifyFull,
        },
        ca_pem_path: tls.root_cert.clone(),
        ..TlsConfig::default()
    };
    // pgwire-replication refuses verify-full to an IP address unless a name is given for SNI;
    // rustls checks the address against the certificate's IP entries, as libpq does.
    if host.parse::<std::net::IpAddr>().is_ok() {
        wire_tls.sni_hostname = Some(host.clone());
    }
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(port)
            .with_tls(wire_tls)
            .with_application_name(format!("trusst-cdc:{slot}"))
            // Report confirmed positions quickly: it is what lets PostgreSQL recycle WAL.
            .with_status_interval(Duration::from_secs(1))
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(8192)
            .with_messages(messages)
            .with_options("-c datestyle=ISO,YMD -c timezone=UTC"),
    )
}

/// The error for a replication connection that could not start, explaining TLS failures.
pub fn replication_error(url: &str, e: pgwire_replication::PgWireError) -> Error {
    if let Ok(Target { config, tls }) = parse_url(url)
        && e.is_tls()
        && let Some(err) = tls.explain(&describe(&config), &e.to_string())
    {
        return err;
    }
    Error::external("starting logical replication").with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_settings_leave_the_url_and_the_rest_stays() {
        let (rest, tls) =
            split_tls("postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem")
                .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(
            tls,
            Tls {
                mode: SslMode::VerifyFull,
                root_cert: Some("/tmp/ca.pem".into())
            }
        );
        let (rest, tls) = split_tls("host=h dbname=d sslmode=require").unwrap();
        assert_eq!(rest, "host=h dbname=d");
        assert_eq!(tls.mode, SslMode::Require);
        let (rest, tls) = split_tls("postgres://h/db").unwrap();
        assert_eq!((rest.as_str(), tls), ("postgres://h/db", Tls::default()));
    }

    #[test]
    fn verify_without_root_cert_names_the_fix() {
        let e = parse_url("postgres://h/db?sslmode=verify-ca").unwrap_err();
        assert!(e.to_string().contains("needs sslrootcert"), "{e}");
        let e = parse_url("postgres://h/db?sslmode=verify").unwrap_err();
        assert!(e.to_string().contains("verify-full"), "{e}");
    }

    #[test]
    fn defaults_fill_only_what_the_url_lacks() {
        let u = with_tls_defaults(
            "postgres://h/db",
            Some(SslMode::Require),
            Some(Path::new("/a b.pem")),
        );
        assert_eq!(u, "postgres://h/db?sslmode=require&sslrootcert=/a%20b.pem");
        let (_, tls) = split_tls(&u).unwrap();
        assert_eq!(tls.root_cert.as_deref(), Some(Path::new("/a b.pem")));
        let u = with_tls_defaults(
            "postgres://h/db?sslmode=disable",
            Some(SslMode::Require),
            None,
        );
        assert_eq!(u, "postgres://h/db?sslmode=disable");
        assert_eq!(
            with_tls_defaults("host=h", Some(SslMode::VerifyFull), None),
            "host=h sslmode='verify-full'"
        );
    }

    #[test]
    fn require_with_a_root_cert_verifies_like_libpq() {
        let t = Tls {
            mode: SslMode::Require,
            root_cert: Some("/ca.pem".into()),
        };
        assert!(t.verifies());
        assert!(
            !Tls {
                mode: SslMode::Require,
                root_cert: None
            }
            .verifies()
        );
    }

    #[test]
    fn a_missing_root_cert_file_is_named() {
        let t = Tls {
            mode: SslMode::VerifyFull,
            root_cert: Some("/nonexistent/ca.pem".into()),
        };
        let e = t.rustls_config().unwrap_err();
        assert!(
            e.to_string().contains("sslrootcert /nonexistent/ca.pem"),
            "{e}"
        );
    }

    #[test]
    fn one_host_of_a_list() {
        assert_eq!(
            with_single_host(
                "postgres://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write",
                "h2",
                5433
            ),
            "postgres://u:p@h2:5433/db?target_session_attrs=read-write"
        );
        assert_eq!(
            with_single_host("postgresql://h1,h2/db", "h1", 5432),
            "postgresql://h1:5432/db"
        );
        assert_eq!(
            with_single_host("host=a,b port=1,2 dbname=d", "b", 2),
            "dbname=d host=b port=2"
        );
        let (rest, _) = split_tls(&with_single_host(
            "postgres://u@a,b/d?sslmode=require",
            "b",
            7,
        ))
        .unwrap();
        assert_eq!(rest, "postgres://u@b:7/d");
    }

    #[test]
    fn a_restarting_server_is_waited_out_but_a_bad_login_is_not() {
        use tokio_postgres::error::SqlState;
        for code in [
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::TOO_MANY_CONNECTIONS,
        ] {
            assert!(server_unavailable(&code), "{code:?}");
        }
        for code in [
            SqlState::INVALID_PASSWORD,
            SqlState::INVALID_CATALOG_NAME,
            SqlState::INSUFFICIENT_PRIVILEGE,
        ] {
            assert!(!server_unavailable(&code), "{code:?}");
        }
    }
}
