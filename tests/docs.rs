//! Runs the examples of README.md and docs/*.md, so the documentation cannot drift from the
//! binary.
//!
//! Every ```console block of those files is a sequence of commands, each a `$ ` line (continued
//! by a trailing `\`, as in a shell), an optional `? N` line (the expected exit status, 0 when
//! absent) and the expected output: standard output and standard error together, in the order
//! written, as a terminal shows them. In the expected output a line `...` matches any number of
//! lines (none included) and `[..]` within a line matches any text; trailing spaces and blank
//! lines at the end are ignored. Each command runs through `sh` with the test binary first on
//! `PATH`, from a fresh directory that mirrors the repository root (a link to each top-level
//! entry), so `fixtures/…` and `target/hf-models/…` resolve as from the root, while files a
//! command writes (`--junit report.xml`) land in the scratch directory and are removed.
//!
//! Blocks fenced as ```sh, ```yaml, ```json or ```text are not run as they stand: they hold
//! templates with the reader's own paths, CI files, schemas and output of other programs. The
//! commands in them are checked by `commands_outside_console_blocks_are_checked` (the
//! reader's files replaced by fixtures, a synopsis against `--help`, make targets against the
//! Makefile), but for the short list in [`NOT_RUN`], each with its reason. A ```console block in any
//! other Markdown file of the repository fails the test, so no example sits where it is not run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One `$ ` command of a console block, with what it must print and return.
#[derive(Debug)]
struct Example {
    file: String,
    /// The line of the block's opening fence.
    block: usize,
    line: usize,
    command: String,
    status: i32,
    expected: Vec<String>,
}

/// The console blocks of a Markdown file, as examples; `Err` for a malformed block.
fn examples(file: &str, text: &str) -> Result<(usize, Vec<Example>), String> {
    let mut out = Vec::new();
    let mut blocks = 0;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((i, line)) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let is_console = info.trim() == "console";
        let mut body = Vec::new();
        let mut closed = false;
        for (j, l) in lines.by_ref() {
            if l.trim() == "```" {
                closed = true;
                break;
            }
            body.push((j, l));
        }
        if !closed {
            return Err(format!("{file}:{}: a code block is never closed", i + 1));
        }
        if !is_console {
            continue;
        }
        blocks += 1;
        let first = out.len();
        let mut body = body.into_iter().peekable();
        while let Some((j, l)) = body.next() {
            let Some(cmd) = l.strip_prefix("$ ") else {
                return Err(format!(
                    "{file}:{}: a console block must start with a `$ ` command, not {l:?}",
                    j + 1
                ));
            };
            let mut command = cmd.to_string();
            while command.ends_with('\\') {
                let Some((_, next)) = body.next() else {
                    return Err(format!("{file}:{}: `\\` continues past the block", j + 1));
                };
                command.push('\n');
                command.push_str(next);
            }
            let mut status = 0;
            if let Some((k, l)) = body.next_if(|(_, l)| l.starts_with("? ")) {
                status = l[2..]
                    .trim()
                    .parse()
                    .map_err(|_| format!("{file}:{}: `? N` wants a number: {l:?}", k + 1))?;
            }
            let mut expected = Vec::new();
            while let Some((_, l)) = body.next_if(|(_, l)| !l.starts_with("$ ")) {
                expected.push(l.to_string());
            }
            out.push(Example {
                file: file.to_string(),
                block: i + 1,
                line: j + 1,
                command,
                status,
                expected,
            });
        }
        if out.len() == first {
            return Err(format!("{file}:{}: an empty console block", i + 1));
        }
    }
    Ok((blocks, out))
}

/// `[..]` in `pattern` matches any text.
fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split("[..]").collect();
    if parts.len() == 1 {
        return pattern == line;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) || line.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &line[first.len()..];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

/// Lines against patterns; a pattern line `...` matches any number of lines.
fn lines_match(patterns: &[&str], lines: &[&str]) -> bool {
    match patterns.split_first() {
        None => lines.is_empty(),
        Some((&"...", rest)) => (0..=lines.len()).any(|skip| lines_match(rest, &lines[skip..])),
        Some((pattern, rest)) => match lines.split_first() {
            Some((line, lines)) => line_matches(pattern, line) && lines_match(rest, lines),
            None => false,
        },
    }
}

/// Trailing spaces off every line, blank lines off the end.
fn normalise(text: &[String]) -> Vec<&str> {
    let mut lines: Vec<&str> = text.iter().map(|l| l.trim_end()).collect();
    while lines.last() == Some(&"") {
        lines.pop();
    }
    lines
}

/// A scratch directory that links to each top-level entry of the repository.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("maskaudit-docs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        for entry in std::fs::read_dir(root()).expect("read the repository root") {
            let entry = entry.unwrap();
            if entry.file_name() != ".git" {
                std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name()))
                    .expect("link into the scratch directory");
            }
        }
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs one example in `dir`; `Err` with a report when its status or output differs.
fn run(example: &Example, dir: &Path) -> Result<(), String> {
    if example.command.contains("target/hf-models/") {
        assert!(
            root().join("target/hf-models/llama/model.pt").is_file(),
            "{}:{} uses target/hf-models, which is missing: run `make hf-models` (make test does)",
            example.file,
            example.line
        );
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_maskaudit")).parent().unwrap();
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!("exec 2>&1\n{}", example.command))
        .current_dir(dir)
        .env("PATH", std::env::join_paths(paths).unwrap())
        // The documented output is the CPU's, without colour, outside GitHub Actions.
        .env("CUDA_VISIBLE_DEVICES", "")
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let key_str = key.to_string_lossy();
        if key_str.starts_with("MASKAUDIT_")
            || key_str.starts_with("GITHUB_")
            || [
                "NO_COLOR",
                "CLICOLOR",
                "CLICOLOR_FORCE",
                "RUST_BACKTRACE",
                "RUST_LOG",
            ]
            .contains(&key_str.as_ref())
        {
            cmd.env_remove(&key);
        }
    }
    let out = cmd.output().expect("run sh");
    let status = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let actual: Vec<String> = text.lines().map(str::to_string).collect();
    let (want, got) = (normalise(&example.expected), normalise(&actual));
    if status == example.status && lines_match(&want, &got) {
        return Ok(());
    }
    Err(format!(
        "{}:{}: $ {}\n  exit status: expected {}, got {status}\n--- expected\n{}\n--- got\n{}\n",
        example.file,
        example.line,
        example.command,
        example.status,
        want.join("\n"),
        got.join("\n")
    ))
}

/// Markdown files under `dir`, skipping hidden and build directories.
fn markdown_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            let skip = name.starts_with('.')
                || ["target", "work", "corpus", "artifacts", "coverage"].contains(&name.as_ref());
            if !skip && !path.is_symlink() {
                markdown_files(&path, out);
            }
        } else if name.ends_with(".md") {
            out.push(path);
        }
    }
}

/// README.md and docs/*.md, the files whose console blocks are run.
fn documented() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(root()).unwrap().display().to_string()
}

#[test]
fn every_console_block_runs_as_documented() {
    let mut failures = Vec::new();
    let mut ran = 0;
    for path in documented() {
        let file = relative(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        let (blocks, examples) = examples(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        // The commands of one block share a scratch directory: a later one may read what an
        // earlier one wrote (a baseline, say).
        let mut blocks_run = std::collections::BTreeSet::new();
        let mut scratch = None;
        for example in &examples {
            ran += 1;
            if blocks_run.insert(example.block) {
                scratch = Some(Scratch::new(&ran.to_string()));
            }
            if let Err(report) = run(example, &scratch.as_ref().unwrap().0) {
                failures.push(report);
            }
        }
        assert_eq!(
            blocks_run.len(),
            blocks,
            "{file}: not every console block ran a command"
        );
        eprintln!(
            "{file}: {blocks} console blocks, {} commands",
            examples.len()
        );
    }
    assert!(ran > 0, "no console block found");
    assert!(
        failures.is_empty(),
        "{} of {ran} documented commands differ from the docs:\n\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn console_blocks_only_where_they_are_run() {
    let covered = documented();
    let mut files = Vec::new();
    markdown_files(root(), &mut files);
    let stray: Vec<String> = files
        .iter()
        .filter(|p| !covered.contains(p))
        .filter(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .lines()
                .any(|l| l.trim_start().strip_prefix("```").map(str::trim) == Some("console"))
        })
        .map(|p| relative(p))
        .collect();
    assert!(
        stray.is_empty(),
        "```console blocks outside README.md and docs/*.md, which tests/docs.rs does not run: \
         {stray:?}; move them there or fence them as ```sh"
    );
}

#[test]
fn the_parser_and_the_wildcards() {
    let text = "intro\n```sh\n$ not run\n```\n```console\n$ a \\\n  --b\n? 1\nout [..] x\n...\n\
                last\n$ c\n```\n";
    let (blocks, ex) = examples("t.md", text).unwrap();
    assert_eq!((blocks, ex.len()), (1, 2));
    assert_eq!(ex[0].command, "a \\\n  --b");
    assert_eq!((ex[0].status, ex[0].line), (1, 6));
    assert_eq!(ex[0].expected, ["out [..] x", "...", "last"]);
    assert_eq!((ex[1].command.as_str(), ex[1].status), ("c", 0));
    assert!(ex[1].expected.is_empty());
    assert!(examples("t.md", "```console\nno command\n```\n").is_err());
    assert!(examples("t.md", "```console\n```\n").is_err());
    assert!(examples("t.md", "```console\n$ a\n").is_err());

    assert!(line_matches("a [..] b", "a 1 2 b"));
    assert!(line_matches("[..]", ""));
    assert!(line_matches("x[..]y[..]z", "xyz"));
    assert!(!line_matches("x[..]y[..]z", "xzy"));
    assert!(!line_matches("ab[..]ba", "aba"));
    assert!(!line_matches("a", "ab"));
    assert!(lines_match(&["a", "...", "d"], &["a", "b", "c", "d"]));
    assert!(lines_match(&["a", "...", "b"], &["a", "b"]));
    assert!(lines_match(&["...", "x"], &["x", "y", "x"]));
    assert!(!lines_match(&["a", "...", "d"], &["a", "b"]));
    assert!(!lines_match(&["a"], &["a", "b"]));
}

/// A fenced block outside ```console: its language, first line number and lines.
struct Fenced {
    file: String,
    lang: String,
    line: usize,
    lines: Vec<String>,
}

fn fenced_blocks(file: &str, text: &str) -> Vec<Fenced> {
    let mut out = vec![];
    let mut open: Option<Fenced> = None;
    for (i, line) in text.lines().enumerate() {
        match (open.take(), line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                open = Some(Fenced {
                    file: file.to_string(),
                    lang: info.trim().to_string(),
                    line: i + 1,
                    lines: vec![],
                })
            }
            (Some(block), Some(_)) => out.push(block),
            (Some(mut block), None) => {
                block.lines.push(line.to_string());
                open = Some(block);
            }
            (None, None) => {}
        }
    }
    out.retain(|b| b.lang != "console");
    out
}

/// The shell commands a non-console block shows: its lines joined across trailing `\`, each
/// without a YAML list's `- `/`run: ` and a trailing `# comment`, kept when they start a
/// program the docs are about.
fn shown_commands(block: &Fenced) -> Vec<(usize, String)> {
    let mut out = vec![];
    let mut pending: Option<(usize, String)> = None;
    for (k, raw) in block.lines.iter().enumerate() {
        let line = raw.trim();
        let (at, mut text) = match pending.take() {
            Some((at, text)) => (at, text + " " + line),
            None => (block.line + 1 + k, line.to_string()),
        };
        if let Some(stripped) = text.strip_suffix('\\') {
            pending = Some((at, stripped.trim_end().to_string()));
            continue;
        }
        for prefix in ["- ", "run: "] {
            if let Some(rest) = text.strip_prefix(prefix) {
                text = rest.to_string();
            }
        }
        if let Some(i) = text.find(" #") {
            text.truncate(i);
        }
        let text = text.trim().to_string();
        let program = text.split_whitespace().next().unwrap_or("");
        let is_ours = [
            "maskaudit",
            "./target/release/maskaudit",
            "make",
            "cargo",
            "python3",
        ]
        .contains(&program)
            || program.starts_with("bench/")
            || program == "/usr/bin/time";
        if is_ours {
            out.push((at, text));
        }
    }
    out
}

/// Commands shown outside console blocks that no test runs, each with the reason. Anything
/// else there must pass `commands_outside_console_blocks_are_checked`.
const NOT_RUN: &[(&str, &str)] = &[
    ("make test", "CI runs it (.ci/run)"),
    (
        "python3 -c 'import json,random; random.seed(0)",
        "performance.md's 69 MB benchmark input; the lint timing is a measurement, not a test",
    ),
];

#[test]
fn commands_outside_console_blocks_are_checked() {
    let makefile = std::fs::read_to_string(root().join("Makefile")).unwrap();
    let mut console = vec![];
    for path in documented() {
        let file = relative(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        console.extend(
            examples(&file, &text)
                .unwrap()
                .1
                .into_iter()
                .map(|e| e.command),
        );
    }
    let dir = Scratch::new("templates");
    let mut problems = vec![];
    let mut checked = 0;
    for path in documented() {
        let file = relative(&path);
        let text = std::fs::read_to_string(&path).unwrap();
        for block in fenced_blocks(&file, &text) {
            for (line, command) in shown_commands(&block) {
                let at = format!("{}:{line} ({}): {command}", block.file, block.lang);
                checked += 1;
                if NOT_RUN.iter().any(|(c, _)| command.starts_with(c)) {
                    continue;
                }
                if let Some(problem) = check_shown(&command, &makefile, &console, &dir.0) {
                    problems.push(format!("{at}\n  {problem}"));
                }
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} commands found outside console blocks"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Why a command shown outside a console block does not hold, if it does not:
/// - `make T`: T is a target; `make demo`'s maskaudit command is a console example, and `make
///   export` runs the exporter that `tests/export/build_models.py` runs on every test model;
/// - a synopsis (`MODEL`, `DATA`, `[--option …]`): every option is in the command's `--help`;
/// - a maskaudit run on the reader's files: it runs on the fixtures instead and ends in a
///   verdict (exit 0 or 1), so every option it shows parses and works together.
fn check_shown(command: &str, makefile: &str, console: &[String], dir: &Path) -> Option<String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    if words[0] == "make" {
        return check_make(&words, makefile, console);
    }
    let at = words.iter().position(|w| w.ends_with("maskaudit"))?;
    let args = &words[at + 1..];
    let subcommand = *args.first()?;
    if !["check", "lint", "explain"].contains(&subcommand) {
        return None; // output text that starts with the name, not a command
    }
    if args.iter().any(|a| ["MODEL", "DATA", "CODE"].contains(a)) {
        let help = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
            .args([subcommand, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout).into_owned();
        let missing: Vec<&str> = command
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && !mentions_option(&help, w))
            .collect();
        // `# check and lint …` lines name options of both: each must be in one of the two.
        return (!missing.is_empty()).then(|| format!("not in `{subcommand} --help`: {missing:?}"));
    }
    // A capture runs with the model it was captured from (tests/export/capture_runs.py and,
    // for --captured-losses, capture_ranks.py: the same weights).
    let captured = args.contains(&"run.parquet") || args.contains(&"--captured-losses");
    let fixtures = [
        (
            "model.pt",
            if captured {
                "target/hf-models/capture/model.pt"
            } else {
                "fixtures/tiny_lm.pt"
            },
        ),
        ("data/train.jsonl", "fixtures/ragged.jsonl"),
        ("data.jsonl", "fixtures/ragged.jsonl"),
        ("sft.jsonl", "fixtures/ragged.jsonl"),
        (
            "run.parquet",
            "target/hf-models/capture/sft_accumulation/run.parquet",
        ),
        (
            "captures/",
            "target/hf-models/capture_ranks/trainer_per_rank",
        ),
    ];
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            fixtures
                .iter()
                .find(|(mine, _)| a == mine)
                .map_or(a.to_string(), |(_, fixture)| fixture.to_string())
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
        .args(&args)
        .current_dir(dir)
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    match out.status.code() {
        Some(0 | 1) => None,
        code => Some(format!(
            "with the fixtures ({}), exit {code:?}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

/// `make T` as the docs show it: T is a target; `make demo`'s maskaudit command is a console
/// example, and `make export` runs the exporter `tests/export/build_models.py` runs.
fn check_make(words: &[&str], makefile: &str, console: &[String]) -> Option<String> {
    let target = words.get(1).copied().unwrap_or("all");
    let head = format!("\n{target}:");
    let Some(at) = makefile.find(&head) else {
        return Some(format!("the Makefile has no target {target}"));
    };
    let lines: Vec<String> = makefile[at + head.len()..]
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with('\t'))
        .map(|l| l.trim().to_string())
        .collect();
    match target {
        "demo" => {
            let run = lines.iter().find(|l| l.contains("maskaudit check"))?;
            let run = run.replace("./target/release/maskaudit", "maskaudit");
            (!console.iter().any(|c| c == &run))
                .then(|| format!("the recipe's `{run}` is no console example"))
        }
        "export" => {
            let exporter = "tools/maskaudit-export.py";
            let built = std::fs::read_to_string(root().join("tests/export/build_models.py"))
                .unwrap()
                .contains("maskaudit-export.py");
            (!(lines.iter().any(|l| l.contains(exporter)) && built))
                .then(|| format!("the recipe or build_models.py no longer runs {exporter}"))
        }
        _ => None,
    }
}

/// Whether `help` names `option` itself, not just an option it is the start of.
fn mentions_option(help: &str, option: &str) -> bool {
    help.match_indices(option).any(|(i, _)| {
        !help[i + option.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// The README's findings table is the registry's (`maskaudit_core::findings::Code`), row for
/// row: a code added, renamed, re-described or given another default severity there changes
/// the README too.
#[test]
fn the_readme_findings_table_is_the_registry() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let start = readme
        .find("| code | default severity | meaning |")
        .expect("README.md has no findings table");
    let table = readme[start..].split("\n\n").next().unwrap();
    let want = maskaudit_core::findings::markdown_table();
    let have: Vec<&str> = table.lines().collect();
    let want: Vec<&str> = want.lines().collect();
    for (i, row) in want.iter().enumerate() {
        assert_eq!(
            have.get(i).copied(),
            Some(*row),
            "README.md's findings table, row {i}: regenerate it from the registry"
        );
    }
    assert_eq!(
        have.len(),
        want.len(),
        "README.md's findings table has extra rows"
    );
}
