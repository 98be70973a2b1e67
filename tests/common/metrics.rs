//! Reading a process's `/metrics`, `/health` and `/ready` in the tests.
#![allow(dead_code)]

use std::collections::BTreeMap;

/// The endpoint a process logged (`metrics endpoint on http://127.0.0.1:PORT ...`), in text or
/// JSON logs.
pub fn endpoint(log: &str) -> Option<String> {
    let marker = "metrics endpoint on http://";
    let at = log.find(marker)? + marker.len() - "http://".len();
    let rest = &log[at..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == '"')
        .unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

/// Wait until a process's log (read by `log`, which fails the test when the process exited)
/// names its endpoint.
pub fn wait_endpoint(what: &str, mut log: impl FnMut() -> String) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let text = log();
        if let Some(url) = endpoint(&text) {
            return url;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} never logged its metrics endpoint:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `GET base + path`: status and body, whatever the status.
pub fn get(base: &str, path: &str) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent
        .get(&format!("{base}{path}"))
        .call()
        .unwrap_or_else(|e| panic!("GET {base}{path}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap())
}

/// One sample of a scrape.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of one `/metrics` scrape.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// Scrape `base/metrics`.
    pub fn of(base: &str) -> Self {
        let (status, text) = get(base, "/metrics");
        assert_eq!(status, 200, "{text}");
        Self::parse(&text)
    }

    /// Parse the text format (`name{k="v",...} value`).
    pub fn parse(text: &str) -> Self {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (
                    n,
                    parse_labels(
                        rest.strip_suffix('}')
                            .unwrap_or_else(|| panic!("bad line {line:?}")),
                    ),
                ),
                None => (series, BTreeMap::new()),
            };
            let value = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Self {
            samples,
            text: text.to_owned(),
        }
    }

    /// The samples of `name` whose labels include every `(key, value)` of `with`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        with: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Sum of the matching samples (0 when there are none).
    pub fn sum(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        self.matching(name, with).map(|s| s.value).sum()
    }

    /// True when at least one sample matches.
    pub fn has(&self, name: &str, with: &[(&str, &str)]) -> bool {
        self.matching(name, with).next().is_some()
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, tail)) = rest.split_once("=\"") {
        // Values here never hold quotes; an escaped one would end the value early.
        let (value, tail) = tail.split_once('"').expect("closing quote");
        out.insert(key.trim_start_matches(',').to_owned(), value.to_owned());
        rest = tail;
    }
    out
}
