//! OData `$batch` bodies (`multipart/mixed`): requests and change sets in, replies out. Pure text
//! handling, tolerant of LF where the standard says CRLF, as servers are.

use std::fmt::Write;

use axum::http::StatusCode;
use serde_json::Value;

/// One HTTP request inside a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Part {
    /// Method, upper case.
    pub method: String,
    /// URL as written: absolute, or relative to the service root.
    pub url: String,
    /// The request's own headers.
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: String,
    /// The MIME part's `Content-ID`, echoed in the reply.
    pub content_id: Option<String>,
}

/// A top-level batch item.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// A request on its own.
    Request(Part),
    /// A change set: requests that succeed or fail together.
    ChangeSet(Vec<Part>),
}

/// An HTTP reply, direct or inside a batch.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Status.
    pub status: StatusCode,
    /// Extra headers.
    pub headers: Vec<(&'static str, String)>,
    /// JSON body.
    pub body: Option<Value>,
    /// `Content-ID` of the request it answers, inside a batch.
    pub content_id: Option<String>,
}

impl Reply {
    /// A reply with a status and a JSON body.
    pub fn new(status: StatusCode, body: Option<Value>) -> Self {
        Self {
            status,
            headers: vec![],
            body,
            content_id: None,
        }
    }

    /// 4xx or 5xx.
    pub fn failed(&self) -> bool {
        self.status.is_client_error() || self.status.is_server_error()
    }
}

/// What a batch answers for one top-level item.
pub enum ReplyItem {
    /// The reply to a request, or the failure that rolled a change set back.
    Single(Reply),
    /// The replies of a committed change set.
    ChangeSet(Vec<Reply>),
}

/// The `boundary` parameter of a multipart content type.
pub fn boundary(content_type: &str) -> Option<String> {
    content_type.split(';').find_map(|param| {
        let (k, v) = param.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Parse a batch body sent with `content_type` (which carries the boundary).
pub fn parse(content_type: &str, body: &str) -> Result<Vec<Item>, String> {
    let b = boundary(content_type).ok_or("the Content-Type has no boundary parameter")?;
    split(body, &b)?
        .into_iter()
        .map(|part| {
            let (headers, content) = head(part);
            match header(&headers, "content-type") {
                Some(ct) if ct.to_ascii_lowercase().starts_with("multipart/mixed") => {
                    let cb = boundary(ct)
                        .ok_or("a change set's Content-Type has no boundary parameter")?;
                    let parts = split(content, &cb)?.into_iter().map(|p| {
                        let (headers, content) = head(p);
                        request(&headers, content)
                    });
                    Ok(Item::ChangeSet(parts.collect::<Result<_, _>>()?))
                }
                _ => Ok(Item::Request(request(&headers, content)?)),
            }
        })
        .collect()
}

/// The parts between `--boundary` lines, up to `--boundary--`; the line break before a delimiter
/// belongs to the delimiter.
fn split<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>, String> {
    let (open, close) = (format!("--{boundary}"), format!("--{boundary}--"));
    let (mut parts, mut start, mut pos) = (vec![], None, 0);
    for line in body.split_inclusive('\n') {
        let text = line.trim_end();
        if text == open || text == close {
            if let Some(s) = start {
                let part = &body[s..pos];
                parts.push(
                    part.strip_suffix("\r\n")
                        .or_else(|| part.strip_suffix('\n'))
                        .unwrap_or(part),
                );
            }
            if text == close {
                return Ok(parts);
            }
            start = Some(pos + line.len());
        }
        pos += line.len();
    }
    Err(format!("the multipart body does not end with {close}"))
}

/// Header lines up to the first empty line, and what follows it.
fn head(text: &str) -> (Vec<(String, String)>, &str) {
    let mut headers = vec![];
    let mut rest = text;
    while !rest.is_empty() {
        let (line, after) = rest.split_once('\n').unwrap_or((rest, ""));
        rest = after;
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    (headers, rest)
}

/// A header's value, by case-insensitive name.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// An `application/http` part: request line, headers, empty line, body.
fn request(mime: &[(String, String)], content: &str) -> Result<Part, String> {
    let (line, rest) = content.split_once('\n').unwrap_or((content, ""));
    let mut words = line.split_whitespace();
    let (Some(method), Some(url)) = (words.next(), words.next()) else {
        return Err(format!("'{}' is not an HTTP request line", line.trim_end()));
    };
    let (headers, body) = head(rest);
    Ok(Part {
        method: method.to_ascii_uppercase(),
        url: url.to_owned(),
        headers,
        body: body.to_owned(),
        content_id: header(mime, "content-id").map(str::to_owned),
    })
}

/// Render the batch response body for `boundary`.
pub fn write_response(boundary: &str, items: &[ReplyItem]) -> String {
    let mut out = String::new();
    for item in items {
        match item {
            ReplyItem::Single(reply) => http_part(&mut out, boundary, reply),
            ReplyItem::ChangeSet(replies) => {
                let cs = format!("changesetresponse_{}", super::guid());
                let _ = write!(
                    out,
                    "--{boundary}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n"
                );
                replies.iter().for_each(|r| http_part(&mut out, &cs, r));
                let _ = write!(out, "--{cs}--\r\n");
            }
        }
    }
    let _ = write!(out, "--{boundary}--\r\n");
    out
}

fn http_part(out: &mut String, boundary: &str, reply: &Reply) {
    let _ = write!(
        out,
        "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    );
    if let Some(id) = &reply.content_id {
        let _ = write!(out, "Content-ID: {id}\r\n");
    }
    let reason = reply.status.canonical_reason().unwrap_or_default();
    let _ = write!(
        out,
        "\r\nHTTP/1.1 {} {reason}\r\nOData-Version: 4.0\r\n",
        reply.status.as_u16()
    );
    for (k, v) in &reply.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    match &reply.body {
        Some(body) => {
            let _ = write!(
                out,
                "Content-Type: application/json; odata.metadata=minimal\r\n\r\n{body}\r\n"
            );
        }
        None => out.push_str("\r\n\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "--batch_AAA\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
PATCH https://org.crm.dynamics.com/api/data/v9.2/contacts(trusst_contact_id='a') HTTP/1.1\r\n\
Content-Type: application/json\r\n\
\r\n\
{\"agentid\":\"x\"}\r\n\
--batch_AAA\r\n\
Content-Type: multipart/mixed; boundary=\"changeset_BBB\"\r\n\
\r\n\
--changeset_BBB\r\n\
Content-Type: application/http\r\n\
Content-Transfer-Encoding: binary\r\n\
Content-ID: 1\r\n\
\r\n\
DELETE contacts(trusst_contact_id='b') HTTP/1.1\r\n\
\r\n\
\r\n\
--changeset_BBB--\r\n\
--batch_AAA--\r\n";

    #[test]
    fn parses_requests_and_change_sets() {
        let items = parse("multipart/mixed; boundary=batch_AAA", BODY).unwrap();
        assert_eq!(items.len(), 2);
        let Item::Request(p) = &items[0] else {
            panic!("{items:?}")
        };
        assert_eq!(p.method, "PATCH");
        assert!(p.url.ends_with("contacts(trusst_contact_id='a')"));
        assert_eq!(header(&p.headers, "CONTENT-TYPE"), Some("application/json"));
        assert_eq!(p.body, "{\"agentid\":\"x\"}");
        let Item::ChangeSet(cs) = &items[1] else {
            panic!("{items:?}")
        };
        assert_eq!(
            (cs[0].method.as_str(), cs[0].content_id.as_deref()),
            ("DELETE", Some("1"))
        );
        assert_eq!(cs[0].body.trim(), "");
    }

    #[test]
    fn accepts_bare_line_feeds_and_refuses_truncation() {
        let lf = BODY.replace("\r\n", "\n");
        assert_eq!(
            parse("multipart/mixed;boundary=\"batch_AAA\"", &lf).unwrap(),
            parse("multipart/mixed; boundary=batch_AAA", BODY).unwrap()
        );
        assert!(
            parse(
                "multipart/mixed; boundary=batch_AAA",
                &BODY[..BODY.len() - 16]
            )
            .unwrap_err()
            .contains("--batch_AAA--")
        );
        assert!(parse("multipart/mixed", BODY).is_err());
    }

    #[test]
    fn writes_replies() {
        let mut ok = Reply::new(StatusCode::NO_CONTENT, None);
        ok.headers.push((
            "OData-EntityId",
            "http://x/api/data/v9.2/contacts(1)".into(),
        ));
        let bad = Reply::new(
            StatusCode::BAD_REQUEST,
            Some(serde_json::json!({"error": {"code": "0x1"}})),
        );
        let text = write_response(
            "batchresponse_1",
            &[ReplyItem::Single(ok), ReplyItem::ChangeSet(vec![bad])],
        );
        assert!(text.starts_with("--batchresponse_1\r\nContent-Type: application/http\r\n"));
        assert!(text.contains(
            "HTTP/1.1 204 No Content\r\nOData-Version: 4.0\r\nOData-EntityId: http://x/api/data/v9.2/contacts(1)\r\n"
        ));
        assert!(text.contains("HTTP/1.1 400 Bad Request\r\n"));
        assert!(text.ends_with("--batchresponse_1--\r\n"));
        // The reply parses back with the same machinery.
        let parts = split(&text, "batchresponse_1").unwrap();
        assert_eq!(parts.len(), 2);
    }
}
