//! GitHub Actions: workflow-command annotations for the findings (`GITHUB_ACTIONS=true`).
//!
//! Each finding becomes `::error file=DATA,line=N,title=CODE::message` (`::warning` for a
//! warning, `::notice` for information, a baselined finding included), pointing at the data
//! file and, for JSONL, the line of the finding's first record; Parquet rows have no line,
//! and standard input (`-`) no file. GitHub shows at most 10 annotations of each kind per
//! step, so at most 10 of each are printed. They go to standard error, which the runner reads
//! for workflow commands as well as standard output, so that `--format json` on stdout stays
//! one JSON document.
//!
//! Escaping is GitHub's (`@actions/core`'s `escapeData` and `escapeProperty`): in the message
//! `%` → `%25`, `\r` → `%0D`, `\n` → `%0A`; in a property value also `:` → `%3A` and
//! `,` → `%2C`.

use std::io::Write;

use crate::data::Unit;
use crate::escape;
use crate::findings::Severity;
use crate::report::Outcome;

/// GitHub shows at most this many annotations of each kind per step.
pub const MAX_PER_KIND: usize = 10;

/// The annotations of a run, one line each, at most [`MAX_PER_KIND`] of each kind.
pub fn annotations(outcome: &Outcome<'_>) -> Vec<String> {
    let mut counts = [0usize; 3];
    let mut lines = vec![];
    for f in outcome.findings {
        let (kind, slot) = match f.severity {
            Severity::Error => ("error", 0),
            Severity::Warning => ("warning", 1),
            Severity::Info => ("notice", 2),
        };
        if counts[slot] == MAX_PER_KIND {
            continue;
        }
        counts[slot] += 1;
        let mut properties = vec![];
        if outcome.data_path != "-" {
            properties.push(format!(
                "file={}",
                escape::github_property(outcome.data_path)
            ));
            if let (Unit::Line, Some(line)) = (outcome.records, f.records.first()) {
                properties.push(format!("line={line}"));
            }
        }
        properties.push(format!("title={}", escape::github_property(f.code.name())));
        lines.push(format!(
            "::{kind} {}::{}",
            properties.join(","),
            escape::github_data(&f.message)
        ));
    }
    lines
}

pub fn write<W: Write>(out: &mut W, outcome: &Outcome<'_>) -> std::io::Result<()> {
    for line in annotations(outcome) {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::findings::{Code, Finding};
    use crate::report::{CommandName, Verdict};

    fn outcome<'a>(findings: &'a [Finding], path: &'a str, records: Unit) -> Outcome<'a> {
        Outcome {
            command: CommandName::Lint,
            data_path: path,
            records,
            findings,
            checks: vec![],
            verdict: Verdict::of(findings),
        }
    }

    #[test]
    fn annotations_point_at_the_first_record_and_stop_at_ten_per_kind() {
        let mut findings: Vec<Finding> = (0..12)
            .map(|i| {
                Finding::new(Code::PaddingTrained, Severity::Error, format!("m{i}"))
                    .with_records(vec![i + 3, 40])
            })
            .collect();
        findings.push(Finding::new(Code::EosMissing, Severity::Warning, "w: 1, 2"));
        let lines = annotations(&outcome(&findings, "d,1.jsonl", Unit::Line));
        assert_eq!(lines.len(), 11);
        assert_eq!(
            lines[0],
            "::error file=d%2C1.jsonl,line=3,title=padding-trained::m0"
        );
        assert_eq!(
            lines[10],
            "::warning file=d%2C1.jsonl,title=eos-missing::w: 1, 2"
        );
        let parquet = annotations(&outcome(&findings[..1], "d.parquet", Unit::Row));
        assert_eq!(
            parquet,
            vec!["::error file=d.parquet,title=padding-trained::m0"]
        );
        let stdin = annotations(&outcome(&findings[..1], "-", Unit::Line));
        assert_eq!(stdin, vec!["::error title=padding-trained::m0"]);
    }
}
