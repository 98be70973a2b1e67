//! `trusst-cdc backfill`: re-publish the COMPLETED contacts whose call falls in a date range,
//! the integration guide's `--start-date/--end-date/--batch-days` sync done through the topic.
//!
//! Windows of `batch_days` days are read in order, each as one scan in contact id order read a
//! page at a time through a portal (never OFFSET, nor a query per page); each page is re-read
//! with the stream's query and published through the source's pipeline, so a stopped backfill
//! can be re-run for the windows it had not finished.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use tokio::sync::watch;
use tokio_postgres::{Client, Portal, Transaction};

use super::publisher::{Job, Pages, Publisher};
use super::schema::Plan;
use super::{Origin, enrich, setup};
use crate::config::SourceConfig;
use crate::error::{self, Error, Result};
use crate::event::lsn as fmt_lsn;

/// What to re-publish.
#[derive(Debug, Clone)]
pub struct Range {
    /// First day (midnight, inclusive).
    pub start: NaiveDate,
    /// Last day's end (midnight, exclusive), as in the guide.
    pub end: NaiveDate,
    /// Days per window.
    pub batch_days: u32,
}

impl Range {
    /// Check the range, naming the fix.
    pub fn new(start: NaiveDate, end: NaiveDate, batch_days: u32) -> Result<Self> {
        if end <= start {
            return Err(Error::user(format!(
                "--end-date {end} is not after --start-date {start}; the end date is exclusive, as in the \
                 integration guide (e.g. --start-date 2025-01-15 --end-date 2025-01-22 covers seven days)"
            )));
        }
        if batch_days == 0 {
            return Err(Error::user("--batch-days must be at least 1"));
        }
        Ok(Self {
            start,
            end,
            batch_days,
        })
    }

    /// The windows `[from, to)` in order.
    pub fn windows(&self) -> Vec<(NaiveDate, NaiveDate)> {
        let mut out = Vec::new();
        let mut from = self.start;
        while from < self.end {
            let to = (from + chrono::Duration::days(i64::from(self.batch_days))).min(self.end);
            out.push((from, to));
            from = to;
        }
        out
    }
}

/// What a backfill did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    /// COMPLETED contacts in the range when it started.
    pub contacts: u64,
    /// Events published and acknowledged (0 on a dry run).
    pub published: u64,
}

/// The guide's time filter, on the call time ([`Plan::in_window`]): a contact is in a window
/// when one of its conversations started in it. Day bounds are UTC midnights for `timestamptz`.
async fn count(client: &Client, plan: &Plan, from: NaiveDate, to: NaiveDate) -> Result<u64> {
    let (from, to) = (midnight(from), midnight(to));
    let n: i64 = client
        .query_one(&plan.window_count_sql(), &[&from, &to])
        .await
        .map_err(|e| error::pg("counting the contacts to backfill", e))?
        .get(0);
    Ok(n as u64)
}

/// A window's contacts in id order (after `after`, if not empty), as a portal of
/// [`Plan::window_ids_sql`] in `tx`.
async fn window(
    tx: &Transaction<'_>,
    plan: &Plan,
    (from, to): (NaiveDate, NaiveDate),
    after: &str,
) -> std::result::Result<Portal, tokio_postgres::Error> {
    let (from, to) = (midnight(from), midnight(to));
    let sql = plan.window_ids_sql(!after.is_empty());
    if after.is_empty() {
        tx.bind(&sql, &[&from, &to]).await
    } else {
        tx.bind(&sql, &[&from, &to, &after]).await
    }
}

/// The next page of a window's contacts: at most `limit`, none once the window is read;
/// `Ok(None)` when the read was cut off in a way that reading the window again after the last
/// contact mends (see [`cut_off`]).
async fn page(tx: &Transaction<'_>, portal: &Portal, limit: usize) -> Result<Option<Vec<String>>> {
    match tx
        .query_portal(portal, i32::try_from(limit).unwrap_or(i32::MAX))
        .await
    {
        Ok(rows) => rows
            .iter()
            .map(|r| enrich::text_at(r, 0))
            .collect::<Result<_>>()
            .map(Some),
        Err(e) if cut_off(&e, tx.client()) => {
            tracing::warn!(error = %e, "the backfill's read of a window was cut off; reading it again after the last contact read");
            Ok(None)
        }
        Err(e) => Err(error::pg("paging the contacts to backfill", e)),
    }
}

/// A window's read cut off by the server rather than failed: a standby cancels a query whose
/// snapshot needs rows that replay removes (SQLSTATE 40001), and ends the session when that
/// query's transaction sits idle between pages, unless `hot_standby_feedback` is on or
/// `max_standby_streaming_delay` lets it finish. (The error that ends a session may arrive
/// before the client has seen the connection close.)
fn cut_off(e: &tokio_postgres::Error, client: &Client) -> bool {
    e.is_closed()
        || client.is_closed()
        || e.code() == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE)
}

/// Times in a row a window's read may be cut off without a page read in between.
const CUTS_IN_A_ROW: u32 = 3;

/// The connection that reads the windows. They filter on call time, which need not be indexed:
/// the planner is left free to scan (the re-read's session holds it to lookups by key).
async fn pager(url: &str) -> Result<Client> {
    let client = crate::pg::connect(url).await?;
    enrich::prepare_scan_session(&client).await?;
    Ok(client)
}

/// A day's start as the text the window bounds are cast from.
fn midnight(d: NaiveDate) -> String {
    format!("{d} 00:00:00")
}

/// Progress: a redrawn line on a terminal, a log line every few seconds otherwise.
struct Progress {
    /// Contacts in the range, once counted (the count runs beside the first pages).
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_log: Instant,
    tty: bool,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            total: None,
            done: 0,
            started: now,
            last_log: now,
            tty: std::io::stderr().is_terminal(),
        }
    }

    fn add(&mut self, n: u64, window: (NaiveDate, NaiveDate)) {
        self.done += n;
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let rate = self.done as f64 / secs;
        let Some(total) = self.total else {
            if self.tty {
                eprint!(
                    "\r\x1b[2Kbackfill {} .. {}: {} contacts (still counting the range), {rate:.0}/s",
                    window.0, window.1, self.done
                );
            } else if self.last_log.elapsed() >= Duration::from_secs(5) {
                self.last_log = Instant::now();
                tracing::info!(
                    window = %format!("{} .. {}", window.0, window.1), done = self.done,
                    rate = format!("{rate:.0}/s"), "backfill progress (the range is still being counted)"
                );
            }
            return;
        };
        let left = total.saturating_sub(self.done);
        let eta = if rate > 0.0 {
            Duration::from_secs_f64(left as f64 / rate)
        } else {
            Duration::ZERO
        };
        let eta = humantime::format_duration(Duration::from_secs(eta.as_secs()));
        if self.tty {
            let pct = if total == 0 {
                100.0
            } else {
                self.done as f64 * 100.0 / total as f64
            };
            eprint!(
                "\r\x1b[2Kbackfill {} .. {}: {}/{} contacts ({pct:.0}%), {rate:.0}/s, ETA {eta}",
                window.0, window.1, self.done, total
            );
        } else if self.last_log.elapsed() >= Duration::from_secs(5) || self.done >= total {
            self.last_log = Instant::now();
            tracing::info!(
                window = %format!("{} .. {}", window.0, window.1), done = self.done, of = total,
                rate = format!("{rate:.0}/s"), eta = %eta, "backfill progress"
            );
        }
    }

    fn finish(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// Count an acknowledged page: its events and the contacts it read, in its window.
fn settled(
    (n, (read, window)): (usize, (u64, (NaiveDate, NaiveDate))),
    totals: &mut Totals,
    progress: &mut Progress,
) {
    totals.published += n as u64;
    progress.add(read, window);
}

/// The count of the range's contacts, running on a connection of its own.
struct RangeCount(Option<tokio::task::JoinHandle<Result<u64>>>);

impl RangeCount {
    fn start(url: &str, plan: &Plan, range: &Range) -> Self {
        let (url, plan, (from, to)) = (url.to_owned(), plan.clone(), (range.start, range.end));
        Self(Some(tokio::spawn(async move {
            let client = crate::pg::connect(&url).await?;
            enrich::prepare_scan_session(&client).await?;
            count(&client, &plan, from, to).await
        })))
    }

    /// Hand the count to `progress` once it is done (without waiting for it).
    async fn poll(&mut self, progress: &mut Progress) -> Result<()> {
        if self.0.as_ref().is_some_and(|h| h.is_finished()) {
            progress.total = Some(self.wait().await?);
        }
        Ok(())
    }

    /// The count, waited for if `progress` does not have it yet.
    async fn settle(&mut self, progress: &mut Progress) -> Result<u64> {
        if progress.total.is_none() {
            progress.total = Some(self.wait().await?);
        }
        Ok(progress.total.unwrap_or_default())
    }

    /// Wait for the count.
    async fn wait(&mut self) -> Result<u64> {
        match self.0.take() {
            Some(h) => h
                .await
                .map_err(|e| Error::internal(format!("counting the backfill range failed: {e}")))?,
            None => Err(Error::internal("the backfill range was counted already")),
        }
    }
}

/// Run the backfill (or, with `dry_run`, only count per window).
pub async fn run(
    cfg: &SourceConfig,
    range: &Range,
    dry_run: bool,
    shutdown: watch::Receiver<bool>,
) -> Result<Totals> {
    let mut client = pager(cfg.database_url()).await?;
    let plan = super::schema::read(&client).await?;
    let windows = range.windows();
    if dry_run {
        // Only a dry run counts per window.
        let totals = Totals {
            contacts: count(&client, &plan, range.start, range.end).await?,
            published: 0,
        };
        for &(from, to) in &windows {
            let n = count(&client, &plan, from, to).await?;
            tracing::info!(window = %format!("{from} .. {to}"), contacts = n, "backfill dry run: would publish");
        }
        tracing::info!(
            contacts = totals.contacts,
            "backfill dry run: nothing published"
        );
        return Ok(totals);
    }

    let out = super::event_producer(cfg, &tokio::sync::OnceCell::new(), None).await?;
    // Events carry the WAL position the backfill started at, to tell them apart when tracing.
    let origin = Origin {
        lsn: setup::current_wal_lsn(&client).await?,
        commit_ts: 0,
        xid: 0,
    };
    tracing::info!(
        windows = windows.len(), topic = %cfg.kafka.topic, at = %fmt_lsn(origin.lsn),
        "backfill started"
    );
    // One count for the whole range, the progress total, on a connection of its own beside the
    // first pages: over a large history it takes seconds the first events need not wait for.
    let mut total = RangeCount::start(cfg.database_url(), &plan, range);
    let mut totals = Totals::default();
    let mut progress = Progress::new();
    let limit = cfg.source.batch_max_contacts;
    // Pages go through the source's publishing pipeline, on connections of its own: the next
    // page's ids are read while earlier pages are re-read, produced and acknowledged.
    let readers =
        super::reread_connections(cfg.database_url(), cfg.source.reread_connections).await?;
    let publisher = Publisher::start(readers, out, &plan, None).await?;
    let mut pages = Pages::new(super::PAGES_INFLIGHT);
    for &(from, to) in &windows {
        let mut after = String::new();
        let mut cuts = 0;
        // A window is one ordered scan, read a page at a time. Its snapshot is held until the
        // window's last page is read, as long as publishing a day of contacts takes; a read cut
        // off (a standby's conflict with recovery) is read again after the last contact.
        'window: loop {
            if cuts >= CUTS_IN_A_ROW {
                return Err(Error::external(format!(
                    "the backfill's read of {from} .. {to} was cut off {cuts} times in a row without a page read \
                     (on a standby: a conflict with recovery): turn hot_standby_feedback on, raise \
                     max_standby_streaming_delay, or backfill from the primary"
                )));
            }
            if client.is_closed() {
                client = pager(cfg.database_url()).await?;
            }
            let tx = match client.transaction().await {
                Ok(tx) => tx,
                Err(e) if e.is_closed() => {
                    cuts += 1;
                    continue 'window;
                }
                Err(e) => return Err(error::pg("starting a backfill window", e)),
            };
            let portal = match window(&tx, &plan, (from, to), &after).await {
                Ok(portal) => portal,
                Err(e) if cut_off(&e, tx.client()) => {
                    cuts += 1;
                    continue 'window;
                }
                Err(e) => return Err(error::pg("reading the contacts to backfill", e)),
            };
            loop {
                if *shutdown.borrow() {
                    while let Some(page) = pages.next().await? {
                        settled(page, &mut totals, &mut progress);
                    }
                    // The count is quick next to the pages: the summary still names the range's size.
                    totals.contacts = total.settle(&mut progress).await?;
                    progress.finish();
                    tracing::warn!(
                        window = %format!("{from} .. {to}"), contact_id = %after, published = totals.published,
                        "backfill interrupted after this contact; re-run it from this window"
                    );
                    return Ok(totals);
                }
                let Some(ids) = page(&tx, &portal, limit).await? else {
                    cuts += 1;
                    continue 'window;
                };
                let Some(last) = ids.last().cloned() else {
                    break 'window;
                };
                // Read per page: a long backfill follows the questions as they change.
                let universal = match tx.query(&plan.questions_sql(), &[]).await {
                    Ok(rows) => enrich::keys_of(&rows)?,
                    Err(e) if cut_off(&e, tx.client()) => {
                        cuts += 1;
                        continue 'window;
                    }
                    Err(e) => return Err(error::pg("loading questions", e)),
                };
                cuts = 0;
                let full = ids.len() == limit;
                let read = ids.len() as u64;
                let mut job = Job::at(ids, origin, "backfill");
                job.universal = Some(universal.into());
                let done = publisher.submit(job).await?;
                if let Some(page) = pages.push(done, (read, (from, to))).await? {
                    total.poll(&mut progress).await?;
                    settled(page, &mut totals, &mut progress);
                }
                after = last;
                if !full {
                    break 'window;
                }
            }
        }
    }
    totals.contacts = total.settle(&mut progress).await?;
    while let Some(page) = pages.next().await? {
        settled(page, &mut totals, &mut progress);
    }
    progress.finish();
    tracing::info!(
        published = totals.published,
        contacts = totals.contacts,
        "backfill done"
    );
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn windows_follow_the_guide() {
        let r = Range::new(d("2025-01-15"), d("2025-01-22"), 1).unwrap();
        let w = r.windows();
        assert_eq!(w.len(), 7);
        assert_eq!(w[0], (d("2025-01-15"), d("2025-01-16")));
        assert_eq!(w[6], (d("2025-01-21"), d("2025-01-22")));
        let r = Range::new(d("2025-01-15"), d("2025-01-22"), 3).unwrap();
        assert_eq!(
            r.windows(),
            vec![
                (d("2025-01-15"), d("2025-01-18")),
                (d("2025-01-18"), d("2025-01-21")),
                (d("2025-01-21"), d("2025-01-22")),
            ]
        );
    }

    #[test]
    fn bad_ranges_name_the_fix() {
        let e = Range::new(d("2025-01-22"), d("2025-01-15"), 1).unwrap_err();
        assert!(e.to_string().contains("exclusive"), "{e}");
        assert!(Range::new(d("2025-01-15"), d("2025-01-15"), 1).is_err());
        let e = Range::new(d("2025-01-15"), d("2025-01-16"), 0).unwrap_err();
        assert!(e.to_string().contains("--batch-days"), "{e}");
    }
}
