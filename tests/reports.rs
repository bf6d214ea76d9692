//! The reports for CI and for people, through the real binary: JUnit XML validated against
//! `tests/junit/junit.xsd` by xmllint, the Markdown summary and the GitHub Actions job summary
//! and annotations, baselines, and the HTML report opened in headless Chromium.
//!
//! xmllint (libxml2-utils) and Chromium come from `make test-tools` (run by `make test`).
//! Without xmllint the JUnit tests fail saying so; without a Chromium that starts, the browser
//! test prints why and is skipped, the one skip in the suite.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct ReportJson {
    findings: Vec<FindingJson>,
    verdict: String,
}

#[derive(Debug, Deserialize)]
struct FindingJson {
    code: String,
    severity: String,
    #[serde(default)]
    baselined: bool,
}

fn json(out: &Output) -> ReportJson {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON report ({e}): {out:?}"))
}

const LOSS_ARGS: &[&str] = &[
    "--loss",
    "fixtures/losses/reduce_then_mask.pt",
    "--loss-args",
    "shift_logits,targets,loss_mask",
];

/// `check` of the fixture model on ragged rows with the founding bug's loss: fails.
fn failing_check(extra: &[&str]) -> Vec<String> {
    [
        "check",
        "fixtures/tiny_lm.pt",
        "fixtures/ragged.jsonl",
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--quiet",
    ]
    .iter()
    .chain(LOSS_ARGS)
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    maskaudit(&refs)
}

fn run_env(args: &[String], env: &[(&str, &str)]) -> Output {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    maskaudit_env(&refs, env)
}

fn xsd() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/junit/junit.xsd")
}

/// Validates `file` against the JUnit schema; panics with xmllint's words if it does not.
fn assert_valid_junit(file: &Path) {
    let out = Command::new("xmllint")
        .arg("--noout")
        .arg("--schema")
        .arg(xsd())
        .arg(file)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "xmllint could not be run ({e}): install libxml2-utils (`make test-tools` does, as root)"
            )
        });
    assert!(
        out.status.success(),
        "{} does not validate against tests/junit/junit.xsd:\n{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The value of `attr="…"` on the first `<element ` in `xml`.
fn attribute(xml: &str, element: &str, attr: &str) -> String {
    let start = xml
        .find(&format!("<{element} "))
        .unwrap_or_else(|| panic!("no <{element}> in {xml}"));
    let tag = &xml[start..start + xml[start..].find('>').unwrap()];
    let key = format!(" {attr}=\"");
    let at = tag
        .find(&key)
        .unwrap_or_else(|| panic!("no {attr} in {tag}"))
        + key.len();
    tag[at..at + tag[at..].find('"').unwrap()].to_string()
}

/// Distinct codes of the error findings: JUnit has one failing test case for each.
fn error_codes(report: &ReportJson) -> usize {
    let mut codes: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.severity == "error")
        .map(|f| f.code.as_str())
        .collect();
    codes.sort_unstable();
    codes.dedup();
    codes.len()
}

#[test]
fn junit_validates_and_fails_one_test_case_per_error_code() {
    let dir = TempDir::new("reports-junit");
    let xml_path = dir.path().join("check.xml");
    let xml_arg = xml_path.display().to_string();
    let out = run(&failing_check(&["--format", "json", "--junit", &xml_arg]));
    assert_eq!(out.code, 1, "{out:?}");
    let report = json(&out);
    assert_valid_junit(&xml_path);
    let xml = std::fs::read_to_string(&xml_path).unwrap();
    let errors = error_codes(&report);
    assert_eq!(errors, 4, "the fixture loss fails four ways: {report:?}");
    assert_eq!(attribute(&xml, "testsuite", "failures"), errors.to_string());
    assert_eq!(xml.matches("<failure ").count(), errors);
    assert_eq!(attribute(&xml, "testsuite", "name"), "maskaudit check");
    // Every check that ran is a test case; information passes with its message.
    assert!(xml.contains("<testcase name=\"padding-contamination\""));
    assert!(xml.contains("<system-out>info[padding-contamination]"));
    assert!(xml.contains("<testcase name=\"off-by-one-shift\" classname=\"maskaudit.check\" file=\"fixtures/ragged.jsonl\"/>"));
    // The gradient checks ran (the loss takes logits); no --accum: no accumulation check.
    assert!(xml.contains("<testcase name=\"gradient-not-cross-entropy\""));
    assert!(!xml.contains("accumulation-misweighted"));
    let tests: usize = attribute(&xml, "testsuite", "tests").parse().unwrap();
    assert_eq!(tests, xml.matches("<testcase ").count());

    // lint, on a file whose name needs escaping: the failure names the first record.
    let data = dir.write(
        "a&b <\"c\">.jsonl",
        &std::fs::read_to_string("fixtures/lint/padding_trained.jsonl").unwrap(),
    );
    let lint_xml = dir.path().join("lint.xml");
    let out = maskaudit(&[
        "lint",
        &data,
        "--pad-id",
        "0",
        "--junit",
        &lint_xml.display().to_string(),
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_valid_junit(&lint_xml);
    let xml = std::fs::read_to_string(&lint_xml).unwrap();
    assert_eq!(attribute(&xml, "testsuite", "name"), "maskaudit lint");
    assert_eq!(attribute(&xml, "testsuite", "failures"), "1");
    assert!(
        xml.contains("a&amp;b &lt;&quot;c&quot;&gt;.jsonl:1\n</failure>"),
        "{xml}"
    );
    // Without --eos-id the EOS checks did not run.
    assert!(!xml.contains("eos-masked"));

    // A clean run: every test case passes.
    let clean_xml = dir.path().join("clean.xml");
    let out = maskaudit(&[
        "lint",
        "fixtures/lint/clean_sft.jsonl",
        "--pad-id",
        "0",
        "--eos-id",
        "2",
        "--junit",
        &clean_xml.display().to_string(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_valid_junit(&clean_xml);
    let xml = std::fs::read_to_string(&clean_xml).unwrap();
    assert_eq!(attribute(&xml, "testsuite", "failures"), "0");
    assert!(xml.contains("<testcase name=\"eos-masked\""));
}

#[test]
fn markdown_summarises_a_failing_user_loss() {
    let out = run(&failing_check(&["--format", "markdown"]));
    assert_eq!(
        out.code, 1,
        "the exit status does not depend on the format: {out:?}"
    );
    let md = &out.stdout;
    assert!(md.starts_with("## maskaudit check: FAIL\n"), "{md}");
    assert!(
        md.contains("| `all_positions_mean` | 0.746319 | -0.372281 | -33.28% |"),
        "{md}"
    );
    assert!(md.contains("### Your loss"), "{md}");
    assert!(
        md.contains("your loss is the mean over all positions, padding included"),
        "{md}"
    );
    // The matched formula's row says so.
    let matched = md
        .lines()
        .find(|l| l.starts_with("| `all_positions_mean` |") && l.ends_with("| yes |"));
    assert!(matched.is_some(), "{md}");
    assert!(md.contains("- probe padding: moved"), "{md}");
    assert!(md.contains("| error | `loss-includes-padding` |"), "{md}");
    assert!(md.trim_end().ends_with("**Verdict: FAIL** ❌"), "{md}");
}

#[test]
fn github_step_summary_is_appended_and_annotations_leave_json_alone() {
    let dir = TempDir::new("reports-github");
    let summary = dir.write("summary.md", "## an earlier step\n");
    let env = [
        ("GITHUB_ACTIONS", "true"),
        ("GITHUB_STEP_SUMMARY", summary.as_str()),
    ];
    let args = failing_check(&["--format", "json"]);
    let out = run_env(&args, &env);
    assert_eq!(out.code, 1, "{out:?}");
    // stdout is still one JSON document; the annotations are on stderr.
    assert_eq!(json(&out).verdict, "fail");
    let annotations: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("::")).collect();
    assert!(
        annotations.iter().any(|a| a.starts_with(
            "::error file=fixtures/ragged.jsonl,title=padding-variance::appending padding columns moved your loss by "
        )),
        "{annotations:?}"
    );
    assert!(annotations.iter().any(
        |a| a.starts_with("::notice file=fixtures/ragged.jsonl,title=padding-contamination::")
    ));

    let text = std::fs::read_to_string(&summary).unwrap();
    assert!(
        text.starts_with("## an earlier step\n## maskaudit check: FAIL\n"),
        "{text}"
    );
    // A second step appends again.
    let out = run_env(&args, &env);
    assert_eq!(out.code, 1);
    let text = std::fs::read_to_string(&summary).unwrap();
    assert_eq!(
        text.matches("## maskaudit check: FAIL").count(),
        2,
        "{text}"
    );
    assert!(text.starts_with("## an earlier step\n"));

    // lint: the annotation points at the first record's line; the path is escaped.
    let data = dir.write(
        "pad,trained.jsonl",
        &std::fs::read_to_string("fixtures/lint/padding_trained.jsonl").unwrap(),
    );
    let out = maskaudit_env(
        &["lint", &data, "--pad-id", "0"],
        &[("GITHUB_ACTIONS", "true")],
    );
    assert_eq!(out.code, 1, "{out:?}");
    let escaped = data.replace(',', "%2C");
    assert!(
        out.stderr.contains(&format!(
            "::error file={escaped},line=1,title=padding-trained::3 padding positions"
        )),
        "{out:?}"
    );
    // Outside GitHub Actions: no workflow commands.
    let out = maskaudit(&["lint", &data, "--pad-id", "0"]);
    assert!(!out.stderr.contains("::error"), "{out:?}");
}

/// Long because it is one story: write a baseline, accept it, add a finding, fail, for lint
/// and for check; split, each step would repeat the set-up of the ones before.
#[test]
fn a_baseline_accepts_known_findings_and_new_ones_still_fail() {
    let dir = TempDir::new("reports-baseline");
    let rows = std::fs::read_to_string("fixtures/lint/padding_trained.jsonl").unwrap();
    let data = dir.write("data.jsonl", &rows);
    let baseline = dir.path().join("baseline.json").display().to_string();
    let lint = |extra: &[&str]| {
        let mut args = vec!["lint", data.as_str(), "--pad-id", "0", "--format", "json"];
        args.extend_from_slice(extra);
        maskaudit(&args)
    };

    let out = lint(&["--write-baseline", &baseline]);
    assert_eq!(
        out.code, 1,
        "writing a baseline does not change this run: {out:?}"
    );
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&baseline).unwrap()).unwrap();
    assert_eq!(written["baseline_version"], 1);
    assert_eq!(written["findings"][0]["code"], "padding-trained");
    assert_eq!(written["findings"][0]["data"], data.as_str());

    let out = lint(&["--baseline", &baseline]);
    assert_eq!(out.code, 0, "{out:?}");
    let report = json(&out);
    assert_eq!(report.verdict, "pass");
    let known = &report.findings[0];
    assert_eq!(
        (
            known.code.as_str(),
            known.severity.as_str(),
            known.baselined
        ),
        ("padding-trained", "info", true)
    );
    // Unchanged data and model files.
    assert_eq!(std::fs::read_to_string(&data).unwrap(), rows);

    // A new problem in the same file still fails; the known one stays accepted.
    let mut grown = rows.clone();
    grown.push_str("{\"input_ids\":[1,6,7,2],\"labels\":[-1,-1,7,2]}\n");
    std::fs::write(&data, grown).unwrap();
    let out = lint(&["--baseline", &baseline]);
    assert_eq!(out.code, 1, "{out:?}");
    let report = json(&out);
    // (The new row also brings labels to a file without them: mixed-mask-source, a warning.)
    let new: Vec<&FindingJson> = report
        .findings
        .iter()
        .filter(|f| !f.baselined && f.severity == "error")
        .collect();
    assert_eq!(new.len(), 1, "{report:?}");
    assert_eq!(
        (new[0].code.as_str(), new[0].severity.as_str()),
        ("unexpected-negative-label", "error")
    );
    // The table says which findings are baselined.
    let out = maskaudit(&["lint", &data, "--pad-id", "0", "--baseline", &baseline]);
    assert!(out.stdout.contains("(baselined)"), "{out:?}");

    // check: the same round trip on the failing loss.
    let check_baseline = dir.path().join("check.json").display().to_string();
    let out = run(&failing_check(&["--write-baseline", &check_baseline]));
    assert_eq!(out.code, 1, "{out:?}");
    let out = run(&failing_check(&["--baseline", &check_baseline]));
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("verdict: pass"), "{out:?}");

    // A baseline that is not one: exit 2, one line.
    let bad = dir.write("bad.json", "{\"findings\": 3}");
    assert_usage_error(
        &lint(&["--baseline", &bad]),
        "bad.json: not a maskaudit baseline",
    );
    let unknown = dir.write(
        "unknown.json",
        "{\"baseline_version\": 1, \"findings\": [{\"code\": \"nope\", \"data\": \"x\"}]}",
    );
    assert_usage_error(
        &lint(&["--baseline", &unknown]),
        "unknown finding code 'nope'",
    );
    let future = dir.write("future.json", "{\"baseline_version\": 2, \"findings\": []}");
    assert_usage_error(&lint(&["--baseline", &future]), "baseline_version 2");
    // Never writes over an input.
    assert_usage_error(
        &lint(&["--junit", &data]),
        &format!(
            "--junit {data}: is the DATA of this run ({data}); refusing to overwrite an input"
        ),
    );
    assert_usage_error(
        &lint(&["--baseline", &baseline, "--html", &baseline]),
        &format!("--html {baseline}: is the --baseline file of this run ({baseline}); refusing"),
    );
    // --write-baseline may update the baseline it reads.
    let out = lint(&["--baseline", &baseline, "--write-baseline", &baseline]);
    assert_eq!(out.code, 1, "the new finding still fails: {out:?}");
    let rewritten = std::fs::read_to_string(&baseline).unwrap();
    assert!(
        rewritten.contains("unexpected-negative-label"),
        "{rewritten}"
    );
}

/// Runs Chromium headless on `args`, with its own profile, waiting at most two minutes (a
/// guard against a hung browser, not a timing assertion). `None` when it cannot start.
fn chromium(profile: &Path, args: &[String]) -> Option<std::process::Output> {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().ok()?.is_some() {
            return child.wait_with_output().ok();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within two minutes: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Long because the browser's DOM is read once and every check of the page is made on it.
#[test]
fn html_report_in_a_real_browser() {
    let version = Command::new("chromium").arg("--version").output();
    if !version.as_ref().is_ok_and(|o| o.status.success()) {
        println!(
            "SKIPPED html_report_in_a_real_browser: chromium cannot be started ({}); `make test-tools` installs it as root",
            match version {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            }
        );
        return;
    }
    let dir = TempDir::new("reports-html");
    let html = dir.path().join("check.html");
    let rows = 12;
    let out = run(&failing_check(&[
        "--html",
        &html.display().to_string(),
        "--html-rows",
        &rows.to_string(),
    ]));
    assert_eq!(out.code, 1, "{out:?}");
    let page = std::fs::read_to_string(&html).unwrap();
    // Self-contained: nothing to fetch.
    for external in ["http://", "https://", " src=", "<link", "@import"] {
        assert!(!page.contains(external), "{external} in the page");
    }

    let url = format!("file://{}", html.display());
    let profile = dir.path().join("profile");
    let dom = chromium(&profile, &["--dump-dom".into(), url.clone()])
        .expect("chromium started for --version but not for --dump-dom");
    assert!(dom.status.success(), "{dom:?}");
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert_eq!(dom.matches("class=\"token-row\"").count(), rows, "{dom}");
    // The loss takes padding in: padding is marked in red; trained tokens are shaded by loss.
    assert!(dom.contains("class=\"tok untrained pad in-loss\""), "{dom}");
    assert!(dom.contains("class=\"tok trained\""), "{dom}");
    assert!(
        dom.contains("background-color: rgba(255, 128, 0,")
            || dom.contains("background-color: rgba(255,128,0,")
    );
    assert!(dom.contains("<h2>Your loss</h2>"));
    assert!(dom.contains("loss-includes-padding"));

    let screenshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("html-report.png");
    let _ = std::fs::remove_file(&screenshot);
    let shot = chromium(
        &profile,
        &[
            format!("--screenshot={}", screenshot.display()),
            "--window-size=1200,900".into(),
            url,
        ],
    )
    .expect("chromium ran before");
    assert!(shot.status.success(), "{shot:?}");
    let png = std::fs::read(&screenshot).expect("the screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    println!("screenshot: {}", screenshot.display());

    // lint: the mask view, no losses; trained padding is red.
    let lint_html = dir.path().join("lint.html");
    let out = maskaudit(&[
        "lint",
        "fixtures/lint/padding_trained.jsonl",
        "--pad-id",
        "0",
        "--html",
        &lint_html.display().to_string(),
        "--tokenizer",
        "fixtures/lint/tokenizer.json",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    let dom = chromium(
        &profile,
        &[
            "--dump-dom".into(),
            format!("file://{}", lint_html.display()),
        ],
    )
    .expect("chromium ran before");
    let dom = String::from_utf8(dom.stdout).unwrap();
    assert_eq!(dom.matches("class=\"token-row\"").count(), 2, "{dom}");
    assert!(dom.contains("class=\"tok trained pad in-loss\""), "{dom}");
    assert!(
        dom.contains("&lt;pad&gt;"),
        "decoded through the tokenizer: {dom}"
    );
    assert!(!dom.contains("loss predicting the token"), "{dom}");
}
