//! `trusst-cdc generate` against real PostgreSQL: what it reports writing is what the database
//! holds, `--duration` ends a paced run short of `--contacts`, and a piped log has no colour codes.

mod common;

use std::process::Command;

use common::{TestDb, bin};

/// Run `generate` on `db`; the `contacts=N` of its closing log line.
fn generate(db: &TestDb, args: &[&str]) -> i64 {
    let out = Command::new(bin())
        .arg("generate")
        .args(args)
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run trusst-cdc generate");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}");
    // Written to a pipe, the log carries no terminal colour codes.
    assert!(
        !stderr.contains('\x1b'),
        "escape codes in a piped log: {stderr:?}"
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("generated COMPLETED contacts"))
        .unwrap_or_else(|| panic!("no closing line in: {stderr}"));
    let n = line.split("contacts=").nth(1).and_then(|rest| {
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    });
    n.unwrap_or_else(|| panic!("no contacts=N in: {line}"))
}

async fn completed_in(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one(
            "SELECT count(*) FROM contacts WHERE current_stage = 'COMPLETED'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// At 50 contacts/s in chunks of 10, a one-second run hands out the chunks due at 0, 0.2, 0.4,
/// 0.6 and 0.8 s and stops before the one due at 1 s, however far short of --contacts; one far
/// behind its schedule stops by the clock.
#[tokio::test]
async fn duration_ends_a_paced_run_short_of_its_count() {
    let db = TestDb::new("gen_duration").await;
    let written = generate(
        &db,
        &[
            "--contacts",
            "100000",
            "--chunk",
            "10",
            "--rate",
            "50",
            "--duration",
            "1s",
            "--seed",
            "5",
        ],
    );
    // Exactly 50 on time; a machine stalled past a chunk's due time stops earlier, by the clock.
    assert!((10..=50).contains(&written), "{written} contacts");
    assert_eq!(completed_in(&db).await, written);
    // Far behind schedule (a rate no database keeps up with), the clock ends the run: at a
    // million contacts/s the schedule alone would run to the end of --contacts.
    let before = completed_in(&db).await;
    let fast = generate(
        &db,
        &[
            "--contacts",
            "1000000",
            "--chunk",
            "50",
            "--rate",
            "1000000",
            "--duration",
            "1s",
            "--seed",
            "7",
        ],
    );
    assert!(fast < 200_000, "{fast} contacts in a one-second run");
    assert_eq!(completed_in(&db).await, before + fast);
    let written = written + fast;
    // Without --duration the count decides.
    let more = generate(&db, &["--contacts", "30", "--chunk", "10", "--seed", "6"]);
    assert_eq!(more, 30);
    assert_eq!(completed_in(&db).await, written + 30);
}
