//! The README as a new user follows it: every shell block runs, in order, in one bash session
//! from the repository root (as pasted into one terminal), against the running local services;
//! a block preceded by `<!-- readme-test: skip, <reason> -->` is not run (Docker, Kubernetes,
//! real CRMs, the build, the test suite itself). Also: every TOML block parses, and every
//! relative link of the README, docs/ and BENCHMARKS.md names a file and heading that exist.
//!
//! The session gets the environment scripts/test.sh exports (service ports), the binary this
//! test was built with on `PATH` (the README's build step is skipped), and a topic of its own
//! (`TRUSST_TOPIC`), so an earlier, failed run's state cannot get in the way.

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const SKIP: &str = "<!-- readme-test: skip";
/// The whole session: services already up, a small database, three sinks.
const TIMEOUT: Duration = Duration::from_secs(300);

/// A fenced block of a Markdown file.
#[derive(Debug)]
struct Block {
    /// Line of the opening fence (1-based).
    line: usize,
    /// The fence's info string (`sh`, `toml`, ...).
    lang: String,
    /// The text between the fences.
    text: String,
    /// The reason of a skip marker on the line before the fence.
    skip: Option<String>,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let lines: Vec<&str> = markdown.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let start = i;
        let end = (i + 1..lines.len())
            .find(|&j| lines[j].trim_end() == "```")
            .unwrap_or_else(|| panic!("README.md:{}: unclosed code block", start + 1));
        let skip = start
            .checked_sub(1)
            .map(|p| lines[p].trim())
            .filter(|l| l.starts_with(SKIP))
            .map(|l| {
                l.trim_start_matches(SKIP)
                    .trim_end_matches("-->")
                    .trim_matches(|c: char| c == ',' || c.is_whitespace())
                    .to_owned()
            });
        out.push(Block {
            line: start + 1,
            lang: lang.trim().to_owned(),
            text: lines[start + 1..end].join("\n"),
            skip,
        });
        i = end + 1;
    }
    out
}

fn readme() -> String {
    std::fs::read_to_string(Path::new(ROOT).join("README.md")).unwrap()
}

fn is_shell(lang: &str) -> bool {
    matches!(lang, "sh" | "bash" | "shell")
}

/// Skip markers say why, and sit only before shell blocks (anything else is never run).
#[test]
fn skip_markers_name_their_reason() {
    for b in blocks(&readme()) {
        if let Some(reason) = &b.skip {
            assert!(
                is_shell(&b.lang),
                "README.md:{}: a skip marker before a {:?} block",
                b.line,
                b.lang
            );
            assert!(
                reason.len() > 5,
                "README.md:{}: say why the block is skipped",
                b.line
            );
        }
    }
}

/// Every TOML example parses (a typo in an example is a typo users copy).
#[test]
fn toml_blocks_parse() {
    for b in blocks(&readme()).iter().filter(|b| b.lang == "toml") {
        if let Err(e) = b.text.parse::<toml::Table>() {
            panic!("README.md:{}: TOML block does not parse: {e}", b.line);
        }
    }
}

/// The keys a config section accepts, from the parser's own refusal of an unknown one
/// (`deny_unknown_fields` lists every field it expected).
fn keys_of<T: serde::de::DeserializeOwned + std::fmt::Debug>(section: &str) -> Vec<String> {
    let err = trusst_cdc::config::parse::<T>(&format!("[{section}]\nreadme_probe = 1\n"))
        .expect_err("an unknown key is refused");
    let expected = err
        .split_once("expected")
        .unwrap_or_else(|| panic!("[{section}]: {err}"))
        .1;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// The README's part from `start` to the next `**`[` header (one sink section's table).
fn part<'a>(readme: &'a str, start: &str) -> &'a str {
    let i = readme
        .find(start)
        .unwrap_or_else(|| panic!("README has no {start}"));
    let rest = &readme[i + start.len()..];
    &rest[..rest.find("\n**`[").unwrap_or(rest.len())]
}

/// The configuration tables name every key the code accepts: the source's as
/// `section.key`, each sink section's within its own table.
#[test]
fn configuration_tables_match_the_code() {
    use trusst_cdc::config::SourceConfig;
    use trusst_cdc::sink::config::SinkConfig;
    let readme = readme();
    let source = part(&readme, "### Source configuration");
    let mut missing = Vec::new();
    let mut checked = 0;
    for section in ["database", "kafka", "source", "metrics"] {
        for key in keys_of::<SourceConfig>(section) {
            checked += 1;
            if !source.contains(&format!("`{section}.{key}`")) {
                missing.push(format!("source: {section}.{key}"));
            }
        }
    }
    for section in [
        "kafka",
        "sink",
        "mapping",
        "salesforce",
        "dynamics",
        "mulesoft",
        "audit",
        "metrics",
    ] {
        let table = part(&readme, &format!("**`[{section}]`**"));
        for key in keys_of::<SinkConfig>(section) {
            checked += 1;
            if !table.contains(&format!("`{key}`")) && !table.contains(&format!("`{key}.")) {
                missing.push(format!("sink: [{section}] {key}"));
            }
        }
    }
    // Every section's keys were read (about 90 in all).
    assert!(
        checked > 80,
        "only {checked} keys read from the config types"
    );
    assert!(
        missing.is_empty(),
        "keys the code accepts that the README's configuration tables do not name:\n{}",
        missing.join("\n")
    );
}

/// Every environment variable the code reads (`env = "..."` of a flag, `env("...")`,
/// `var("...")`, and the quoted names in `src/`) is named by the README.
#[test]
fn environment_variables_are_documented() {
    let readme = readme();
    let mut files = vec![Path::new(ROOT).join("src")];
    let mut names = BTreeSet::new();
    while let Some(p) = files.pop() {
        if p.is_dir() {
            // The emulator and the generator's own settings are not the connector's.
            if p.ends_with("emulator") {
                continue;
            }
            files.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        // (`prefix` is part of the name: the SASL pair is listed as ("KAFKA_SASL_...", key).)
        for (marker, prefix) in [
            ("env = \"", ""),
            ("env(\"", ""),
            ("var(\"", ""),
            ("(\"KAFKA_SASL_", "KAFKA_SASL_"),
        ] {
            let mut rest = text.as_str();
            while let Some(i) = rest.find(marker) {
                let tail = &rest[i + marker.len()..];
                let name: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if name.len() > 3 && tail[name.len()..].starts_with('"') {
                    names.insert(format!("{prefix}{name}"));
                }
                rest = tail;
            }
        }
    }
    assert!(names.len() > 15, "only {names:?} found");
    let missing: Vec<&String> = names
        .iter()
        .filter(|n| !readme.contains(&format!("`{n}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "environment variables the code reads that the README does not name: {missing:?}"
    );
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to '-'.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut in_code = false;
    let mut out = BTreeSet::new();
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        } else if !in_code && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Relative links (`](path)`, `](path#anchor)`, `](#anchor)`) outside code blocks.
fn links(markdown: &str) -> Vec<(usize, String)> {
    let mut in_code = false;
    let mut out = Vec::new();
    for (n, line) in markdown.lines().enumerate() {
        if line.starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let Some(end) = tail.find(')') else { break };
            let target = &tail[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push((n + 1, target.to_owned()));
            }
            rest = &tail[end..];
        }
    }
    out
}

/// Every relative link of the README, docs/ and BENCHMARKS.md names an existing file, and
/// every `#anchor` a heading of that file: the README was split into docs/, and a moved
/// section must not leave a dead link behind.
#[test]
fn links_resolve() {
    let root = Path::new(ROOT);
    let mut files = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let path = e.unwrap().path();
        // docs/ also holds images (docs/img); only its pages have links.
        if path.extension().is_some_and(|x| x == "md") {
            files.push(path);
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, target) in links(&text) {
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let dest: PathBuf = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            let where_ = format!(
                "{}:{line}: {target}",
                file.strip_prefix(root).unwrap().display()
            );
            if !dest.exists() {
                broken.push(format!("{where_} (no such file)"));
            } else if !anchor.is_empty() {
                let text = std::fs::read_to_string(&dest).unwrap_or_default();
                if !anchors(&text).contains(anchor) {
                    broken.push(format!("{where_} (no such heading)"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// Kill the session's process group (background processes the README started included).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        // The `--` matters: procps-ng 4.0's kill reads `-KILL -12345` as the signal and then
        // the group `-1`, i.e. every process on the machine.
        if self.0 > 1 {
            let _ = Command::new("kill")
                .args(["-s", "KILL", "--", &format!("-{}", self.0)])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Every shell block that is not marked to be skipped runs, in README order, in one bash
/// session with `set -euo pipefail`; the test fails on the first block that fails, naming its
/// line, with the session's output.
#[test]
fn shell_blocks_run_as_a_new_user_would() {
    let blocks: Vec<Block> = blocks(&readme())
        .into_iter()
        .filter(|b| is_shell(&b.lang))
        .collect();
    let run: Vec<&Block> = blocks.iter().filter(|b| b.skip.is_none()).collect();
    assert!(
        run.len() >= 8,
        "only {} runnable shell blocks: the quick start is gone?",
        run.len()
    );
    let mut script = String::from(
        "set -euo pipefail\n\
         trap 'echo \"README.md:$readme_line: the block starting here failed (exit $?)\" >&2' ERR\n",
    );
    for b in &run {
        script.push_str(&format!(
            "readme_line={}\necho \"+++ README.md:{}\" >&2\n{}\n",
            b.line, b.line, b.text
        ));
    }
    script.push_str("echo README-DONE\n");

    let work = tempfile::tempdir().unwrap();
    let out_path = work.path().join("out.log");
    let out = std::fs::File::create(&out_path).unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_trusst-cdc"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let topic = format!("readme-{:x}.contacts", rand::random::<u32>());
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(ROOT)
        .env("PATH", path)
        .env("TRUSST_TOPIC", &topic)
        // A new user's shell: nothing of the test harness's own settings.
        .env_remove("DATABASE_URL")
        .env_remove("TRUSST_METRICS_LISTEN")
        .env_remove("TRUSST_LOG")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .expect("bash");
    let _group = Group(child.id());
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    // Shown with --nocapture: what a user would have seen.
    println!("{output}");
    let tail: Vec<&str> = output.lines().rev().take(80).collect();
    let tail: String = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
    match status {
        None => panic!(
            "the README's shell blocks did not finish within {TIMEOUT:?}; last output:\n{tail}"
        ),
        Some(s) => assert!(
            s.success() && output.contains("README-DONE"),
            "a README shell block failed ({s}); last output:\n{tail}"
        ),
    }
}
