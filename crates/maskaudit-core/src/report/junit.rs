//! `--junit FILE`: the findings as JUnit XML, for CI test reports (GitLab
//! `artifacts:reports:junit`, Jenkins `junit`, GitHub test-reporter actions).
//!
//! One `<testsuite>` for the command (`maskaudit check` or `maskaudit lint`) inside a
//! `<testsuites>` root. One `<testcase>` per check that ran, named by the finding code it
//! emits ([`crate::report::Report::checks`]): a check with an error finding fails (a
//! `<failure>` whose `message` is the finding's and whose body adds the first records, as
//! `file:line`); a warning or information finding, or a baselined one, passes with its
//! message in `<system-out>`; a check that found nothing passes empty. So `failures` equals
//! the number of error findings' codes, and a run fails its CI test report exactly when its
//! exit status is 1. The schema it is validated against in the tests is
//! `tests/junit/junit.xsd` (the Jenkins/Ant JUnit structure).
//!
//! Escaped by hand: five entities, and characters XML 1.0 cannot carry (control characters
//! other than tab, newline and carriage return) become U+FFFD.

use std::fmt::Write as _;
use std::io::Write;

use crate::data::{Pos, Unit};
use crate::escape;
use crate::findings::{Code, Finding, Severity};
use crate::report::Outcome;

/// The findings' records as `path:7` (or `path:row 7`), for a failure's body.
pub fn records_text(path: &str, records: Unit, finding: &Finding) -> String {
    finding
        .records
        .iter()
        .map(|&n| format!("{path}:{}", Pos { unit: records, n }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One check's `<testcase>`, with a `<failure>` for its error findings and its other findings
/// in `<system-out>`; whether it failed.
fn testcase(cases: &mut String, outcome: &Outcome<'_>, code: Code, classname: &str) -> bool {
    let found: Vec<&Finding> = outcome.findings.iter().filter(|f| f.code == code).collect();
    let _ = write!(
        cases,
        "    <testcase name=\"{}\" classname=\"{}\" file=\"{}\"",
        escape::xml(code.name()),
        escape::xml(classname),
        escape::xml(outcome.data_path)
    );
    if found.is_empty() {
        cases.push_str("/>\n");
        return false;
    }
    cases.push_str(">\n");
    let (errors, others): (Vec<&Finding>, Vec<&Finding>) =
        found.iter().partition(|f| f.severity == Severity::Error);
    if !errors.is_empty() {
        let message = errors
            .iter()
            .map(|f| f.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let body = findings_text(outcome, &errors, |_| "error".to_string());
        let _ = writeln!(
            cases,
            "      <failure type=\"{}\" message=\"{}\">{}</failure>",
            escape::xml(code.name()),
            escape::xml(&message),
            escape::xml_text(&body)
        );
    }
    if !others.is_empty() {
        let text = findings_text(outcome, &others, |f| f.severity.to_string());
        let _ = writeln!(
            cases,
            "      <system-out>{}</system-out>",
            escape::xml_text(&text)
        );
    }
    cases.push_str("    </testcase>\n");
    !errors.is_empty()
}

/// Each finding as `label[code]: message`, and its first records.
fn findings_text(
    outcome: &Outcome<'_>,
    findings: &[&Finding],
    label: impl Fn(&Finding) -> String,
) -> String {
    let mut text = String::new();
    for f in findings {
        let _ = writeln!(text, "{}[{}]: {}", label(f), f.code, f.message);
        if !f.records.is_empty() {
            let _ = writeln!(
                text,
                "first records: {}",
                records_text(outcome.data_path, outcome.records, f)
            );
        }
    }
    text
}

/// The JUnit XML of a run: one testsuite, a testcase per check that ran.
pub fn write<W: Write>(out: &mut W, outcome: &Outcome<'_>) -> std::io::Result<()> {
    let command = outcome.command.as_str();
    let suite = format!("maskaudit {command}");
    let classname = format!("maskaudit.{command}");
    let mut cases = String::new();
    let mut failures = 0usize;
    for &code in &outcome.checks {
        failures += usize::from(testcase(&mut cases, outcome, code, &classname));
    }
    let tests = outcome.checks.len();
    writeln!(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>")?;
    writeln!(
        out,
        "<testsuites name=\"maskaudit\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\">"
    )?;
    writeln!(
        out,
        "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" file=\"{}\">",
        escape::xml(&suite),
        escape::xml(outcome.data_path)
    )?;
    writeln!(out, "    <properties>")?;
    for (name, value) in [
        ("data", outcome.data_path),
        ("verdict", outcome.verdict.as_str()),
        ("maskaudit_version", env!("CARGO_PKG_VERSION")),
    ] {
        writeln!(
            out,
            "      <property name=\"{name}\" value=\"{}\"/>",
            escape::xml(value)
        )?;
    }
    writeln!(out, "    </properties>")?;
    out.write_all(cases.as_bytes())?;
    writeln!(out, "  </testsuite>")?;
    writeln!(out, "</testsuites>")
}
