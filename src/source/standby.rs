//! One source per slot, any number of standbys: which source may run a session, and what the
//! others do meanwhile.
//!
//! PostgreSQL lets one walsender at a time stream from a slot (`active_pid`), which already
//! keeps two sources from streaming at once. Before it streams, though, a session does work
//! that must not overlap with another source either: it creates the slot, publishes the initial
//! snapshot or a recovery. So a session first *claims* the slot: it takes a session-level
//! advisory lock named after the slot and checks that no walsender holds the slot. It keeps the
//! lock until its own walsender holds the slot, then lets go of it; from then on the slot
//! itself is the claim. A source that finds either taken stands by: it polls until both are
//! free, then starts a session (and claims again, so two standbys cannot both take over).
//!
//! A source that dies frees both at once: its connections close. One that stops answering
//! without dying (a frozen process, a lost host) holds the slot until PostgreSQL gives up on it
//! after `wal_sender_timeout`, which the source sets for its own replication connection from
//! `[source] takeover_after`.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_postgres::Client;

use crate::config::SourceConfig;
use crate::error::{self, Result};

/// The first key of the claim's advisory lock (`pg_try_advisory_lock(int4, int4)`): "tc", so
/// it does not collide with an application's single-key locks; the second is the slot's hash.
const LOCK_CLASS: i32 = 0x7463;

/// How often a standby checks whether the slot is free.
pub const POLL: Duration = Duration::from_millis(500);

/// The backend that holds the slot or the claim, as `pg_stat_activity` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its process id on the database server.
    pub pid: i32,
    /// `streaming` (the slot's walsender) or `setting up` (the claim, before streaming).
    pub doing: &'static str,
    /// `application_name` and client address, when the server shows them.
    pub who: String,
}

impl Holder {
    fn unknown(pid: i32, doing: &'static str) -> Self {
        Self {
            pid,
            doing,
            who: String::new(),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pid {}, {}", self.pid, self.doing)?;
        if !self.who.is_empty() {
            write!(f, ", {}", self.who)?;
        }
        Ok(())
    }
}

/// Who holds the slot or its claim now, if anyone (read by standbys; takes nothing).
pub async fn holder(client: &Client, slot: &str) -> Result<Option<Holder>> {
    let row = client
        .query_one(
            "SELECT (SELECT active_pid FROM pg_replication_slots WHERE slot_name = $2), \
                    (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND classid = $1::int4::oid AND objid = hashtext($2)::oid AND objsubid = 2 LIMIT 1)",
            &[&LOCK_CLASS, &slot],
        )
        .await
        .map_err(|e| error::pg(format!("reading who holds replication slot {slot}"), e))?;
    let (active, claimed): (Option<i32>, Option<i32>) = (row.get(0), row.get(1));
    let holder = match (active, claimed) {
        (Some(pid), _) => Holder::unknown(pid, "streaming"),
        (None, Some(pid)) => Holder::unknown(pid, "setting up"),
        (None, None) => return Ok(None),
    };
    Ok(Some(describe(client, holder).await))
}

/// Fill in who the holder is (best effort: the name is for the log).
async fn describe(client: &Client, mut h: Holder) -> Holder {
    if let Ok(Some(r)) = client
        .query_opt(
            "SELECT concat_ws(' from ', nullif(application_name, ''), host(client_addr)) \
             FROM pg_stat_activity WHERE pid = $1",
            &[&h.pid],
        )
        .await
    {
        h.who = r.get::<_, Option<String>>(0).unwrap_or_default();
    }
    h
}

/// Claim the slot for this session: `None` when claimed (the advisory lock is then held by
/// `client`'s connection until [`release`] or until it closes), else who holds it.
pub async fn try_claim(client: &Client, slot: &str) -> Result<Option<Holder>> {
    let locked: bool = client
        .query_one(
            "SELECT pg_try_advisory_lock($1, hashtext($2))",
            &[&LOCK_CLASS, &slot],
        )
        .await
        .map_err(|e| error::pg(format!("claiming replication slot {slot}"), e))?
        .get(0);
    if !locked {
        // Taken meanwhile or not, the poll that follows finds out.
        return Ok(Some(
            holder(client, slot)
                .await?
                .unwrap_or_else(|| Holder::unknown(0, "setting up")),
        ));
    }
    match holder(client, slot).await? {
        Some(h) if h.doing == "streaming" => {
            release(client, slot).await;
            Ok(Some(h))
        }
        _ => Ok(None),
    }
}

/// Let go of the claim once this session's walsender holds the slot (best effort: the lock
/// goes with the connection anyway).
pub async fn release(client: &Client, slot: &str) {
    if let Err(e) = client
        .query_one(
            "SELECT pg_advisory_unlock($1, hashtext($2))",
            &[&LOCK_CLASS, &slot],
        )
        .await
    {
        tracing::debug!(slot, error = %e, "releasing the claim on the slot");
    }
}

/// The pid in PostgreSQL's "replication slot \"x\" is active for PID 123" (SQLSTATE 55006),
/// the answer to a `START_REPLICATION` for a slot another walsender streams from.
pub fn active_pid_in(message: &str) -> Option<i32> {
    if !message.contains("55006") {
        return None;
    }
    let tail = &message[message.find("active for PID ")? + "active for PID ".len()..];
    let digits: String = tail.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// How long PostgreSQL lets this source's replication connection go without an answer before it
/// ends it (and a standby may take the slot): `[source] takeover_after`, else the server's
/// `wal_sender_timeout`; `None` when that is 0 (never).
pub async fn lease(cfg: &SourceConfig, client: &Client) -> Result<Option<Duration>> {
    if let Some(t) = cfg.source.takeover_after {
        return Ok(Some(t));
    }
    let ms: i64 = client
        .query_one(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
            &[],
        )
        .await
        .map_err(|e| error::pg("reading wal_sender_timeout", e))?
        .get(0);
    Ok((ms > 0).then(|| Duration::from_millis(ms as u64)))
}

/// Stand by while another source holds the slot: poll until it is free, saying who holds it
/// whenever that changes. `Ok(true)` once the slot is free, `Ok(false)` on shutdown.
pub async fn wait(
    cfg: &SourceConfig,
    first: Holder,
    shutdown: &watch::Receiver<bool>,
) -> Result<bool> {
    let slot = &cfg.source.slot;
    crate::metrics::ready(super::NOT_STANDING_BY, false);
    let since = Instant::now();
    let say = |h: &Holder| {
        tracing::info!(
            slot = %slot, pid = h.pid, holder = %h,
            "another source holds slot {slot} (pid {}); standing by", h.pid
        );
    };
    say(&first);
    if cfg.source.takeover_after.is_none() {
        tracing::info!(
            slot = %slot,
            "a holder that stops answering keeps the slot until the server's wal_sender_timeout (60s by default) ends \
             its connection; [source] takeover_after shortens that"
        );
    }
    let mut last = first.pid;
    let mut client: Option<Client> = None;
    let mut shutdown = shutdown.clone();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.wait_for(|v| *v) => return Ok(false),
        }
        if client.as_ref().is_none_or(Client::is_closed) {
            let url = match crate::pg::resolve_host(cfg.database_url()).await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "standby: no database host answers");
                    continue;
                }
            };
            client = crate::pg::connect(&url).await.ok();
        }
        let Some(c) = &client else { continue };
        match holder(c, slot).await {
            Ok(Some(h)) => {
                if h.pid != last {
                    say(&h);
                    last = h.pid;
                }
            }
            Ok(None) => {
                tracing::info!(slot = %slot, stood_by = ?since.elapsed(), "slot {slot} is free: taking over");
                crate::metrics::ready(super::NOT_STANDING_BY, true);
                return Ok(true);
            }
            Err(e) => {
                tracing::debug!(error = %e, "standby: reading the slot failed; reconnecting");
                client = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_of_a_busy_slot() {
        assert_eq!(
            active_pid_in(
                "server error: replication slot \"slot_1\" is active for PID 4242 (SQLSTATE 55006)"
            ),
            Some(4242)
        );
        assert_eq!(
            active_pid_in("replication slot \"s\" does not exist (SQLSTATE 42704)"),
            None
        );
        assert_eq!(active_pid_in("something (SQLSTATE 55006)"), None);
    }

    #[test]
    fn holders_say_what_they_do() {
        let h = Holder {
            pid: 7,
            doing: "streaming",
            who: "trusst-cdc:s from 10.0.0.5".into(),
        };
        assert_eq!(
            h.to_string(),
            "pid 7, streaming, trusst-cdc:s from 10.0.0.5"
        );
    }
}
