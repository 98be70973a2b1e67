//! The source on every PostgreSQL major a customer may run, 13 to 18 (the rest of the suite runs
//! on Debian's 15): the server binaries come from the npm builds through
//! `scripts/services.sh` (`PG_VERSION`), one cluster per major on port 555NN. One focused run
//! per version covers the snapshot, streaming, a late completion, a delete, an unchanged TOASTed
//! answer and a question change, and ends with the topic equal to the guide's pivot query.

mod common;

use std::time::Duration;

use common::*;
use trusst_cdc::generate::{Generator, Options};

const WAIT: Duration = Duration::from_secs(90);

fn has_all(ids: &[String]) -> impl FnMut(&[Record]) -> bool + '_ {
    move |recs| {
        ids.iter()
            .all(|id| recs.iter().any(|r| &r.key == id && r.value.is_some()))
    }
}

async fn end_to_end_on(major: u32) {
    let base = cluster(major, &format!("pg{major}"), 25500 + major as u16, None);
    let db = TestDb::new_on(&base, &format!("v{major}")).await;
    let before = completed(&db, 100 + u64::from(major), 12).await;
    let mut src = SourceProc::start(&db, SourceOpts::default());
    let (_, check) = src.run_once(&db, "check");
    assert!(
        check.contains(&format!("ok    PostgreSQL {major}")),
        "check names the version:\n{check}"
    );
    let mut reader = TopicReader::new(&src.topic);
    reader.until(WAIT, "the snapshot", has_all(&before));
    src.wait_streaming();

    let c = db.client().await;
    // A late completion: answers written during INFERENCE, the stage set later.
    c.batch_execute(
        "INSERT INTO contacts (contact_id, external_id, current_stage, agent_id, direction) VALUES ('late-1', 'ext-late', 'INFERENCE', 'agent_7', 'inbound');
         INSERT INTO inferences (inference_id, contact_id, question_id, result) VALUES ('li-1', 'late-1', 'q-agent-identified', 'true');",
    )
    .await
    .unwrap();
    // A long answer stored out of line, left unchanged by a later update of its row.
    let long = Generator::new(7, Options::default()).text(7000);
    c.execute(
        "INSERT INTO contacts (contact_id, current_stage) VALUES ('toast-1', 'COMPLETED')",
        &[],
    )
    .await
    .unwrap();
    c.execute(
        "INSERT INTO inferences (inference_id, contact_id, question_id, result) VALUES ('ti-1', 'toast-1', 'q-resolution', $1)",
        &[&long],
    )
    .await
    .unwrap();
    let streamed = completed(&db, 200 + u64::from(major), 8).await;
    c.batch_execute(&format!(
        "UPDATE contacts SET current_stage = 'COMPLETED' WHERE contact_id = 'late-1';
         UPDATE inferences SET updated_at = now() + interval '1 minute' WHERE inference_id = 'ti-1';
         DELETE FROM contacts WHERE contact_id = '{}';
         UPDATE questions SET key = 'call_quality' WHERE question_id = 'q-quality-score';",
        before[0]
    ))
    .await
    .unwrap();
    reader.until(WAIT, "the stream, the delete and the re-emit", |r| {
        has_all(&streamed)(r)
            && r.iter().any(|r| r.key == "late-1")
            && r.iter().filter(|r| r.key == "toast-1").count() >= 2
            && r.iter().any(|r| r.key == before[0] && r.value.is_none())
            && r.iter()
                .filter_map(Record::event)
                .any(|e| e.source.reason == "question")
    });
    reader.settle(Duration::from_secs(2));
    src.assert_running();
    let latest = reader.latest();
    let toast = latest["toast-1"]
        .universal_questions
        .iter()
        .find(|q| q.question_key == "resolution_notes")
        .and_then(|q| q.result.clone());
    assert_eq!(
        toast.as_deref(),
        Some(long.as_str()),
        "the whole TOASTed answer"
    );
    assert!(
        latest.values().all(|e| e
            .universal_questions
            .iter()
            .all(|q| q.question_key != "quality_score")),
        "the renamed question is re-emitted under its new key"
    );
    assert_matches_seed(&latest, &db.expected().await);
    assert!(src.terminate().success(), "{}", src.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_13() {
    end_to_end_on(13).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_14() {
    end_to_end_on(14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_16() {
    end_to_end_on(16).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_17() {
    end_to_end_on(17).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_18() {
    end_to_end_on(18).await;
}
