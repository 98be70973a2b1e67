//! PostgreSQL connections: the regular client (queries) and the replication stream's config,
//! both from one libpq-style URL.

use std::time::Duration;

use pgwire_replication::ReplicationConfig;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::error::{Error, Result};

/// Parse a libpq-style URL, naming the problem when it is malformed.
pub fn parse_url(url: &str) -> Result<Config> {
    url.parse::<Config>().map_err(|e| {
        Error::user(format!(
            "invalid database URL: {e}; expected postgres://user:password@host:port/database"
        ))
    })
}

/// Connect a regular client; the connection task runs in the background and logs its end.
pub async fn connect(url: &str) -> Result<Client> {
    let mut config = parse_url(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let (client, conn) = config.connect(NoTls).await.map_err(|e| {
        let hint = describe(&config);
        match e.as_db_error() {
            // Starting up, shutting down or restarting (a failover, a restart): the source's
            // reconnect loop must wait it out, not stop as if the configuration were wrong.
            Some(db) if server_unavailable(db.code()) => {
                Error::external(format!("PostgreSQL at {hint} is not accepting connections now: {}", db.message()))
            }
            Some(db) => Error::user(format!("PostgreSQL at {hint} refused the connection: {}", db.message())),
            None => Error::external(format!("cannot connect to PostgreSQL at {hint}; check DATABASE_URL and that the server is running"))
                .with_source(e),
        }
    })?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
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

/// `host:port/db` for messages (never the password).
pub fn describe(config: &Config) -> String {
    let (host, port) = host_port(config);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

/// The replication stream's config for `slot` and `publication`, from the same URL.
pub fn replication_config(url: &str, slot: &str, publication: &str) -> Result<ReplicationConfig> {
    let config = parse_url(url)?;
    let (host, port) = host_port(&config);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or(&user).to_owned();
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(port)
            .with_application_name(format!("trusst-cdc:{slot}"))
            // Report confirmed positions quickly: it is what lets PostgreSQL recycle WAL.
            .with_status_interval(Duration::from_secs(1))
            .with_wakeup_interval(Duration::from_secs(5))
            .with_buffer_size(8192)
            .with_options("-c datestyle=ISO,YMD -c timezone=UTC"),
    )
}

#[cfg(test)]
mod tests {
    use tokio_postgres::error::SqlState;

    use super::server_unavailable;

    #[test]
    fn a_restarting_server_is_waited_out_but_a_bad_login_is_not() {
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
