//! Dataverse `$batch` bodies: building the multipart/mixed request and reading the response
//! (pure, no I/O).
//!
//! Every request is a top-level part, never inside a changeset: a changeset is atomic, so one
//! bad record would roll back the whole batch. With `Prefer: odata.continue-on-error` the
//! service answers every part, in request order, each with its own HTTP status.

use std::time::Duration;

use crate::error::Result;
use crate::sink::Outcome;
use crate::sink::verdict::{Verdict, of_status};

/// One request inside a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `PATCH` or `DELETE`.
    pub method: &'static str,
    /// Absolute URL (Dataverse accepts absolute URLs in parts).
    pub url: String,
    /// JSON body; `None` for a DELETE.
    pub body: Option<String>,
}

/// One part of a `$batch` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartResponse {
    /// The `Content-ID` echoed by the service, when it echoes one.
    pub content_id: Option<usize>,
    /// The part's HTTP status.
    pub status: u16,
    /// The part's HTTP headers (names lower-cased).
    pub headers: Vec<(String, String)>,
    /// The part's body (usually empty or an OData error).
    pub body: String,
}

impl PartResponse {
    /// A header of the inner HTTP response, by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A fresh boundary, `batch_` and 32 hex digits; random so no JSON body can contain it.
pub fn new_boundary() -> String {
    format!("batch_{:032x}", rand::random::<u128>())
}

/// Bytes kept as they are in a key value: RFC 3986 unreserved characters, plus the single
/// quote, which OData escapes by doubling and which Dataverse expects literally.
fn keep(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~'".contains(&b)
}

/// A string key value as an OData literal for a URL: single quotes doubled (OData's escape),
/// then percent-encoded so spaces, `%`, `/`, `?` or `#` cannot break the request line.
pub fn key_literal(value: &str) -> String {
    let doubled = value.replace('\'', "''");
    let mut out = String::with_capacity(doubled.len() + 2);
    out.push('\'');
    for b in doubled.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push('\'');
    out
}

/// The URL of a record addressed by its alternate key:
/// `{api}/{entity_set}({key}='{value}')`.
///
/// This is what makes a PATCH an upsert on the Trusst contact id. The integration guide's
/// example PATCHed `contacts({external_id})`, which is a primary-key (GUID) lookup: it cannot
/// create a record keyed by our id and fails for any value that is not the row's GUID.
pub fn key_url(api: &str, entity_set: &str, key: &str, value: &str) -> String {
    format!("{api}/{entity_set}({key}={})", key_literal(value))
}

/// The multipart/mixed body of a batch, CRLF line endings, parts numbered from 1 by
/// `Content-ID` in request order.
pub fn build(boundary: &str, requests: &[Request]) -> String {
    let mut out = String::new();
    for (i, r) in requests.iter().enumerate() {
        out.push_str(&format!("--{boundary}\r\n"));
        out.push_str("Content-Type: application/http\r\n");
        out.push_str("Content-Transfer-Encoding: binary\r\n");
        out.push_str(&format!("Content-ID: {}\r\n", i + 1));
        out.push_str("\r\n");
        out.push_str(&format!("{} {} HTTP/1.1\r\n", r.method, r.url));
        if let Some(body) = &r.body {
            out.push_str("Content-Type: application/json\r\n");
            out.push_str("\r\n");
            out.push_str(body);
        } else {
            out.push_str("\r\n");
        }
        // The CRLF before a delimiter belongs to the delimiter (RFC 2046 §5.1.1).
        out.push_str("\r\n");
    }
    out.push_str(&format!("--{boundary}--\r\n"));
    out
}

/// The `boundary` parameter of a multipart Content-Type, unquoted.
pub fn boundary_of(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Split at the first blank line (CRLF CRLF, or LF LF from a lenient server).
fn split_head(s: &str) -> (&str, &str) {
    match (s.find("\r\n\r\n"), s.find("\n\n")) {
        (Some(a), Some(b)) if b < a => (&s[..b], &s[b + 2..]),
        (Some(a), _) => (&s[..a], &s[a + 4..]),
        (None, Some(b)) => (&s[..b], &s[b + 2..]),
        (None, None) => (s, ""),
    }
}

fn header_lines(head: &str) -> impl Iterator<Item = (String, String)> + '_ {
    head.lines().filter_map(|l| {
        let (k, v) = l.split_once(':')?;
        Some((k.trim().to_ascii_lowercase(), v.trim().to_owned()))
    })
}

/// Read a `$batch` response body into its parts, in order. Nested multipart parts (changeset
/// responses, which we never send but a service may still use) are flattened.
pub fn parse(content_type: &str, body: &str) -> Result<Vec<PartResponse>, String> {
    let boundary = boundary_of(content_type)
        .ok_or_else(|| format!("no boundary in Content-Type {content_type:?}"))?;
    let mut out = Vec::new();
    parse_into(&boundary, body, &mut out)?;
    Ok(out)
}

fn parse_into(boundary: &str, body: &str, out: &mut Vec<PartResponse>) -> Result<(), String> {
    let delim = format!("--{boundary}");
    let mut pieces = body.split(delim.as_str());
    pieces.next(); // preamble
    let mut closed = false;
    for piece in pieces {
        if piece.starts_with("--") {
            closed = true;
            break;
        }
        // Drop transport padding and the line break after the delimiter, and the one before
        // the next delimiter.
        let piece = piece.trim_start_matches([' ', '\t']);
        let piece = piece
            .strip_prefix("\r\n")
            .or_else(|| piece.strip_prefix('\n'))
            .unwrap_or(piece);
        let piece = piece
            .strip_suffix("\r\n")
            .or_else(|| piece.strip_suffix('\n'))
            .unwrap_or(piece);
        let (head, content) = split_head(piece);
        let headers: Vec<(String, String)> = header_lines(head).collect();
        let ctype = headers
            .iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if ctype.to_ascii_lowercase().starts_with("multipart/") {
            let inner = boundary_of(ctype)
                .ok_or_else(|| format!("no boundary in nested Content-Type {ctype:?}"))?;
            parse_into(&inner, content, out)?;
            continue;
        }
        let content_id = headers
            .iter()
            .find(|(k, _)| k == "content-id")
            .and_then(|(_, v)| v.trim_matches(['<', '>']).parse().ok());
        out.push(parse_http(content, content_id)?);
    }
    // A response cut short has parts but no closing delimiter; what was read is still valid,
    // and the caller notices missing parts by counting.
    if !closed {
        tracing::debug!("$batch response without a closing delimiter");
    }
    Ok(())
}

/// An `application/http` part: `HTTP/1.1 204 No Content`, headers, blank line, body.
fn parse_http(s: &str, content_id: Option<usize>) -> Result<PartResponse, String> {
    let s = s.trim_start_matches(['\r', '\n']);
    let (head, body) = split_head(s);
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or("").trim();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/"))
        .ok_or_else(|| {
            format!(
                "part without an HTTP status line: {:?}",
                status_line.chars().take(80).collect::<String>()
            )
        })?;
    let headers = header_lines(&head[head.find('\n').map_or(head.len(), |i| i + 1)..]).collect();
    Ok(PartResponse {
        content_id,
        status,
        headers,
        body: body.trim().to_owned(),
    })
}

/// `"<code>: <message>"` from an OData error body `{"error":{"code","message"}}`, or the status
/// and the start of the body when it is something else.
pub fn error_text(status: u16, body: &str) -> String {
    let v: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let err = v.as_ref().and_then(|v| v.get("error"));
    let code = err
        .and_then(|e| e.get("code"))
        .and_then(|c| c.as_str())
        .filter(|c| !c.is_empty());
    let msg = err.and_then(|e| e.get("message")).and_then(|m| m.as_str());
    match (code, msg) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (None, Some(m)) => format!("HTTP {status}: {m}"),
        _ => {
            let b: String = body.chars().take(300).collect();
            if b.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {b}")
            }
        }
    }
}

/// Seconds from a part's `Retry-After`, capped at an hour.
fn part_retry_after(p: &PartResponse) -> Option<Duration> {
    p.header("retry-after")?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(3600.0)))
}

/// One [`Outcome`] per request from the parts of a response to `n` requests.
///
/// 2xx is written (for a DELETE, 404 too: already gone). Otherwise each part's status gives its
/// [`Verdict`]: a dead-letter is that record's fault (rejected with the service's code and
/// message); a retry in any part, or fewer parts than requests (the service stopped early),
/// makes the whole call retried (safe: upserts and deletes are idempotent); a stop in any part
/// stops the sink.
pub fn outcomes(parts: &[PartResponse], n: usize, delete: bool) -> Result<Vec<Outcome>> {
    // Parts come in request order; when every part echoes a usable Content-ID, trust that.
    let by_id = parts.len() <= n
        && parts
            .iter()
            .all(|p| p.content_id.is_some_and(|c| (1..=n).contains(&c)))
        && {
            let mut ids: Vec<usize> = parts.iter().filter_map(|p| p.content_id).collect();
            ids.sort_unstable();
            ids.dedup();
            ids.len() == parts.len()
        };
    let mut slots: Vec<Option<&PartResponse>> = vec![None; n];
    for (i, p) in parts.iter().enumerate() {
        let at = if by_id {
            p.content_id.unwrap_or(0).saturating_sub(1)
        } else {
            i
        };
        if at < n {
            slots[at] = Some(p);
        }
    }

    // Each part gets the verdict its status gives; the worst one decides for the call.
    let verdict = |p: &PartResponse| {
        if (200..300).contains(&p.status) || (delete && p.status == 404) {
            None
        } else {
            Some(of_status(p.status, part_retry_after(p)))
        }
    };
    let transient: Vec<&PartResponse> = parts
        .iter()
        .filter(|p| matches!(verdict(p), Some(Verdict::Retry(_))))
        .collect();
    if !transient.is_empty() {
        let wait = transient.iter().filter_map(|p| part_retry_after(p)).max();
        let shown: Vec<String> = transient
            .iter()
            .take(3)
            .map(|p| error_text(p.status, &p.body))
            .collect();
        return Err(Verdict::Retry(wait).error(format!(
            "Dataverse $batch: {} of {n} requests failed transiently (resending the batch): {}",
            transient.len(),
            shown.join("; ")
        )));
    }
    // A permission problem is the application user's, not the record's: it would fail every
    // record alike, so it stops the sink as a top-level 403 does instead of dead-lettering.
    let stopped: Vec<&PartResponse> = parts
        .iter()
        .filter(|p| verdict(p) == Some(Verdict::Stop))
        .collect();
    if let Some(p) = stopped.first() {
        return Err(Verdict::Stop.error(format!(
            "Dataverse $batch: HTTP {} in {} of {n} requests ({}); give the application user a security role \
             with the needed privileges on the table and its columns",
            p.status,
            stopped.len(),
            error_text(p.status, &p.body)
        )));
    }
    let missing = slots.iter().filter(|s| s.is_none()).count();
    if missing > 0 {
        return Err(Verdict::Retry(None).error(format!(
            "Dataverse $batch answered {} of {n} requests; the service stopped early (resending the batch)",
            n - missing
        )));
    }
    Ok(slots
        .into_iter()
        .map(|p| {
            let p = p.expect("no missing parts");
            match verdict(p) {
                None => Outcome::Written,
                Some(_) => Outcome::Rejected(error_text(p.status, &p.body)),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_literals_double_quotes_and_encode() {
        assert_eq!(key_literal("c-1"), "'c-1'");
        assert_eq!(key_literal("O'Brien"), "'O''Brien'");
        assert_eq!(
            key_literal("a b/c?d#e%f&g+h"),
            "'a%20b%2Fc%3Fd%23e%25f%26g%2Bh'"
        );
        assert_eq!(key_literal("é"), "'%C3%A9'");
        assert_eq!(
            key_url(
                "https://org.crm.dynamics.com/api/data/v9.2",
                "contacts",
                "trusst_contact_id",
                "c-1"
            ),
            "https://org.crm.dynamics.com/api/data/v9.2/contacts(trusst_contact_id='c-1')"
        );
    }

    #[test]
    fn boundaries_are_fresh() {
        let a = new_boundary();
        assert!(a.starts_with("batch_") && a.len() == 38, "{a}");
        assert_ne!(a, new_boundary());
    }

    #[test]
    fn builds_the_exact_multipart_body() {
        let reqs = [
            Request {
                method: "PATCH",
                url: "https://o/api/data/v9.2/contacts(k='a')".into(),
                body: Some(r#"{"x":1}"#.into()),
            },
            Request {
                method: "DELETE",
                url: "https://o/api/data/v9.2/contacts(k='b')".into(),
                body: None,
            },
        ];
        let expected = "--batch_X\r\n\
            Content-Type: application/http\r\n\
            Content-Transfer-Encoding: binary\r\n\
            Content-ID: 1\r\n\
            \r\n\
            PATCH https://o/api/data/v9.2/contacts(k='a') HTTP/1.1\r\n\
            Content-Type: application/json\r\n\
            \r\n\
            {\"x\":1}\r\n\
            --batch_X\r\n\
            Content-Type: application/http\r\n\
            Content-Transfer-Encoding: binary\r\n\
            Content-ID: 2\r\n\
            \r\n\
            DELETE https://o/api/data/v9.2/contacts(k='b') HTTP/1.1\r\n\
            \r\n\
            \r\n\
            --batch_X--\r\n";
        assert_eq!(build("batch_X", &reqs), expected);
        // No bare LF anywhere.
        let body = build("batch_X", &reqs);
        assert!(
            body.match_indices('\n')
                .all(|(i, _)| i > 0 && &body[i - 1..i] == "\r")
        );
        // Our own parser reads what we build as two requests (sanity of the framing).
        assert_eq!(body.matches("--batch_X\r\n").count(), 2);
    }

    #[test]
    fn boundary_from_content_type() {
        assert_eq!(
            boundary_of("multipart/mixed; boundary=batchresponse_1").as_deref(),
            Some("batchresponse_1")
        );
        assert_eq!(
            boundary_of("multipart/mixed; charset=utf-8; Boundary=\"b q\"").as_deref(),
            Some("b q")
        );
        assert_eq!(boundary_of("application/json"), None);
    }

    fn part(status: &str, extra: &str, body: &str) -> String {
        format!(
            "--batchresponse_R\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nHTTP/1.1 {status}\r\n{extra}OData-Version: 4.0\r\n\r\n{body}\r\n"
        )
    }

    const CT: &str = "multipart/mixed; boundary=batchresponse_R";

    #[test]
    fn a_403_in_a_part_stops_the_sink() {
        let denied = r#"{"error":{"code":"0x80040220","message":"Principal user is missing prvWriteContact privilege"}}"#;
        let body = format!(
            "{}{}--batchresponse_R--\r\n",
            part("204 No Content", "", ""),
            part(
                "403 Forbidden",
                "Content-Type: application/json\r\n",
                denied
            ),
        );
        let parts = parse(CT, &body).unwrap();
        let e = outcomes(&parts, 2, false).unwrap_err();
        assert_eq!(e.fault, crate::error::Fault::User, "{e}");
        assert!(!e.retryable);
        assert!(
            e.message().contains("prvWriteContact") && e.message().contains("security role"),
            "{e}"
        );
    }

    #[test]
    fn parses_mixed_parts_in_order() {
        let err = r#"{"error":{"code":"0x80040203","message":"The property 'x' does not exist on type 'Microsoft.Dynamics.CRM.contact'"}}"#;
        let body = format!(
            "{}{}{}--batchresponse_R--\r\n",
            part(
                "204 No Content",
                "OData-EntityId: https://o/api/data/v9.2/contacts(1)\r\n",
                ""
            ),
            part(
                "400 Bad Request",
                "Content-Type: application/json; odata.metadata=minimal\r\n",
                err
            ),
            part("201 Created", "", "{}")
        );
        let parts = parse(CT, &body).unwrap();
        assert_eq!(
            parts.iter().map(|p| p.status).collect::<Vec<_>>(),
            [204, 400, 201]
        );
        assert_eq!(
            parts[0].header("odata-entityid"),
            Some("https://o/api/data/v9.2/contacts(1)")
        );
        assert_eq!(parts[1].body, err);
        let out = outcomes(&parts, 3, false).unwrap();
        assert_eq!(out[0], Outcome::Written);
        assert_eq!(
            out[1],
            Outcome::Rejected("0x80040203: The property 'x' does not exist on type 'Microsoft.Dynamics.CRM.contact'".into())
        );
        assert_eq!(out[2], Outcome::Written);
    }

    #[test]
    fn a_throttled_part_makes_the_call_retryable_with_its_wait() {
        let body = format!(
            "{}{}{}--batchresponse_R--\r\n",
            part("204 No Content", "", ""),
            part(
                "400 Bad Request",
                "",
                r#"{"error":{"code":"0x1","message":"bad"}}"#
            ),
            part(
                "429 Too Many Requests",
                "Retry-After: 7\r\n",
                r#"{"error":{"code":"0x80072322","message":"Number of requests exceeded the limit of 6000 over time window of 300 seconds."}}"#
            )
        );
        let parts = parse(CT, &body).unwrap();
        let e = outcomes(&parts, 3, false).unwrap_err();
        assert!(e.retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert!(e.message().contains("0x80072322"), "{e}");
        // A 5xx part without Retry-After: retryable, no wait imposed.
        let body = format!(
            "{}--batchresponse_R--\r\n",
            part("503 Service Unavailable", "", "")
        );
        let e = outcomes(&parse(CT, &body).unwrap(), 1, false).unwrap_err();
        assert!(e.retryable && e.retry_after.is_none());
    }

    #[test]
    fn missing_parts_are_retryable() {
        let body = format!("{}--batchresponse_R--\r\n", part("204 No Content", "", ""));
        let e = outcomes(&parse(CT, &body).unwrap(), 3, false).unwrap_err();
        assert!(
            e.retryable && e.message().contains("answered 1 of 3"),
            "{e}"
        );
        // A body cut off without the closing delimiter still yields the parts read.
        let cut = part("204 No Content", "", "");
        assert_eq!(parse(CT, &cut).unwrap().len(), 1);
    }

    #[test]
    fn delete_404_counts_as_deleted() {
        let body = format!(
            "{}{}--batchresponse_R--\r\n",
            part(
                "404 Not Found",
                "",
                r#"{"error":{"code":"0x80040217","message":"contact With Ids = x Does Not Exist"}}"#
            ),
            part("204 No Content", "", "")
        );
        let parts = parse(CT, &body).unwrap();
        assert_eq!(
            outcomes(&parts, 2, true).unwrap(),
            [Outcome::Written, Outcome::Written]
        );
        assert!(
            matches!(&outcomes(&parts, 2, false).unwrap()[0], Outcome::Rejected(m) if m.starts_with("0x80040217: "))
        );
    }

    #[test]
    fn content_ids_place_parts_and_changesets_flatten() {
        let body = "--batchresponse_R\r\nContent-Type: multipart/mixed; boundary=changesetresponse_C\r\n\r\n\
            --changesetresponse_C\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 2\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n\r\n\
            --changesetresponse_C\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\nContent-ID: 1\r\n\r\nHTTP/1.1 400 Bad Request\r\n\r\n{\"error\":{\"code\":\"0x2\",\"message\":\"no\"}}\r\n\
            --changesetresponse_C--\r\n--batchresponse_R--\r\n";
        let parts = parse(CT, body).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            outcomes(&parts, 2, false).unwrap(),
            [Outcome::Rejected("0x2: no".into()), Outcome::Written]
        );
    }

    #[test]
    fn lenient_about_bare_line_feeds() {
        let body = "--batchresponse_R\nContent-Type: application/http\n\nHTTP/1.1 204 No Content\n\n\n--batchresponse_R--\n";
        let parts = parse(CT, body).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].status, 204);
    }

    #[test]
    fn error_text_without_odata_body() {
        assert_eq!(error_text(400, "plain"), "HTTP 400: plain");
        assert_eq!(error_text(412, ""), "HTTP 412");
        assert_eq!(
            error_text(400, r#"{"error":{"message":"m"}}"#),
            "HTTP 400: m"
        );
    }

    #[test]
    fn garbage_part_is_an_error() {
        let body = "--batchresponse_R\r\nContent-Type: application/http\r\n\r\nnot http\r\n--batchresponse_R--\r\n";
        assert!(parse(CT, body).is_err());
        assert!(parse("text/plain", "").is_err());
    }
}
