//! Keeping an event within the broker's size limit (pure: no I/O).
//!
//! Kafka refuses a record larger than the smaller of the producer's `message.max.bytes` and the
//! topic's `max.message.bytes`. A refused event cannot be retried into success, and holding the
//! slot until it goes through would stall the stream and hold WAL on the customer's database
//! for ever. Paragraph and Summary answers can be megabytes, so the policy is: shorten the
//! longest texts (answers first, then question texts) just enough for the event to fit, and
//! list each shortened text in the event's `truncated` field, so a reader always knows. An event
//! that cannot fit even with every text emptied is [`Fit::TooLarge`]; the caller records it.

use super::{ContactEvent, Truncated};

/// What [`fit`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// The event was within the limit as it was.
    Fits,
    /// Texts were shortened; the event now fits and its `truncated` lists them.
    Truncated,
    /// Even with every answer and question text emptied the event is `size` bytes.
    TooLarge {
        /// Encoded size at that point.
        size: usize,
    },
}

/// Which text of a question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Result,
    QuestionText,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Result => "result",
            Field::QuestionText => "question_text",
        }
    }
}

/// The longest byte index not above `at` that starts a character.
fn floor_char_boundary(s: &str, at: usize) -> usize {
    let mut i = at.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Shorten `event`'s longest texts until `size(event) <= limit`. `size` is the encoded size in
/// the topic's format (JSON or Avro), so escaping and framing count. Every step cuts the
/// longest remaining text by at least the excess, answers before question texts, so the loop
/// ends after at most a few encodings per text.
pub fn fit(event: &mut ContactEvent, limit: usize, size: impl Fn(&ContactEvent) -> usize) -> Fit {
    let mut n = size(event);
    if n <= limit {
        return Fit::Fits;
    }
    let mut cuts: Vec<(usize, Field, u32)> = Vec::new();
    while n > limit {
        let text = |q: &super::QuestionResult, f: Field| match f {
            Field::Result => q.result.as_deref().map_or(0, str::len),
            Field::QuestionText => q.question_text.as_deref().map_or(0, str::len),
        };
        let pick = |f: Field| {
            event
                .universal_questions
                .iter()
                .enumerate()
                .map(|(i, q)| (text(q, f), i))
                .max()
                .filter(|(len, _)| *len > 0)
                .map(|(len, i)| (len, i, f))
        };
        let Some((len, i, field)) = pick(Field::Result).or_else(|| pick(Field::QuestionText))
        else {
            return Fit::TooLarge { size: n };
        };
        if !cuts.iter().any(|(j, f, _)| *j == i && *f == field) {
            cuts.push((i, field, len as u32));
        }
        let q = &mut event.universal_questions[i];
        let s = match field {
            Field::Result => q.result.as_mut(),
            Field::QuestionText => q.question_text.as_mut(),
        }
        .expect("picked a present text");
        // At least the excess, and a little more so the marker's own bytes are covered.
        let keep = floor_char_boundary(s, len.saturating_sub((n - limit).max(64)));
        s.truncate(keep);
        event.truncated = Some(
            cuts.iter()
                .map(|(j, f, original)| {
                    let q = &event.universal_questions[*j];
                    Truncated {
                        question_key: q.question_key.clone(),
                        field: f.name().to_owned(),
                        original_bytes: *original,
                        kept_bytes: text(q, *f) as u32,
                    }
                })
                .collect(),
        );
        n = size(event);
    }
    Fit::Truncated
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Op, QuestionResult, SourcePosition, avro};
    use proptest::prelude::*;

    fn event(results: &[String]) -> ContactEvent {
        ContactEvent {
            schema_version: 1,
            event_id: "0/1:c".into(),
            op: Op::Upsert,
            trusst_contact_id: "c".into(),
            external_id: None,
            stream_id: None,
            call_date: None,
            call_start_time: None,
            direction: None,
            contact_agent_id: None,
            s3_agent_id: None,
            conn_id: None,
            universal_questions: results
                .iter()
                .enumerate()
                .map(|(i, r)| QuestionResult {
                    question_id: format!("q{i}"),
                    question_key: format!("k{i}"),
                    question_text: Some("A question?".into()),
                    result_type: "Paragraph".into(),
                    question_group: None,
                    result: Some(r.clone()),
                    inference_updated_at: None,
                })
                .collect(),
            source: SourcePosition {
                lsn: "0/1".into(),
                commit_ts: None,
                txid: None,
                reason: "stream".into(),
            },
            truncated: None,
            cleared_question_keys: None,
            customer: None,
        }
    }

    fn json(e: &ContactEvent) -> usize {
        e.to_json().len()
    }

    #[test]
    fn small_events_are_left_alone() {
        let mut e = event(&["yes".into()]);
        assert_eq!(fit(&mut e, 10_000, json), Fit::Fits);
        assert_eq!(e.truncated, None);
    }

    #[test]
    fn the_longest_answers_are_cut_first_and_listed() {
        let big = "x".repeat(3_000_000);
        let mut e = event(&["short".into(), big.clone(), big, "medium text".into()]);
        assert_eq!(fit(&mut e, 1_000_000, json), Fit::Truncated);
        assert!(json(&e) <= 1_000_000);
        let t = e.truncated.clone().unwrap();
        assert_eq!(t.len(), 2, "{t:?}");
        assert!(
            t.iter()
                .all(|t| t.original_bytes == 3_000_000 && t.field == "result")
        );
        assert_eq!(e.universal_questions[0].result.as_deref(), Some("short"));
        assert_eq!(
            e.universal_questions[3].result.as_deref(),
            Some("medium text")
        );
        let back = ContactEvent::from_json(&e.to_json()).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn cuts_land_on_character_boundaries() {
        let mut e = event(&["é".repeat(100_000)]);
        assert_eq!(fit(&mut e, 50_000, json), Fit::Truncated);
        let r = e.universal_questions[0].result.as_deref().unwrap();
        assert!(r.chars().all(|c| c == 'é'));
    }

    #[test]
    fn too_small_a_limit_is_reported() {
        let mut e = event(&["abc".into()]);
        assert!(matches!(fit(&mut e, 10, json), Fit::TooLarge { .. }));
    }

    proptest! {
        /// Whatever the texts (escapes, multi-byte characters) and the format, the result fits,
        /// every shortened text is listed with its sizes and is a prefix of the original.
        #[test]
        fn always_fits_and_says_what_it_cut(
            texts in proptest::collection::vec("[a-zé\"\\\\\n€😀]{0,3000}", 1..6),
            limit in 600usize..6000,
            use_avro in any::<bool>(),
        ) {
            let original = event(&texts);
            let mut e = original.clone();
            let size = |e: &ContactEvent| if use_avro { avro::encode(e, 7).len() } else { json(e) };
            match fit(&mut e, limit, size) {
                Fit::Fits => prop_assert_eq!(&e, &original),
                Fit::Truncated => {
                    prop_assert!(size(&e) <= limit);
                    let t = e.truncated.clone().unwrap();
                    for (q, o) in e.universal_questions.iter().zip(&original.universal_questions) {
                        let r = q.result.as_deref().unwrap();
                        let full = o.result.as_deref().unwrap();
                        prop_assert!(full.starts_with(r));
                        if r.len() < full.len() {
                            prop_assert!(t.iter().any(|t| t.question_key == q.question_key
                                && t.field == "result"
                                && t.original_bytes as usize == full.len()
                                && t.kept_bytes as usize == r.len()));
                        }
                    }
                }
                Fit::TooLarge { size: n } => prop_assert!(n > limit),
            }
        }
    }
}
