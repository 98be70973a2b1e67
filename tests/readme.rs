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
        files.push(e.unwrap().path());
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
        let _ = Command::new("kill")
            .args(["-KILL", &format!("-{}", self.0)])
            .status();
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
