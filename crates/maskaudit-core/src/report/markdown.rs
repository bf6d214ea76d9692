//! `--format markdown`, and the GitHub Actions job summary (`GITHUB_STEP_SUMMARY`): the
//! report as GitHub-flavoured Markdown.
//!
//! For `check`: what ran on what, the aggregates table, the user-loss table and verdict when a
//! loss was given, the findings and the verdict; for `lint`: the statistics instead of the
//! aggregates. Table cells are escaped (`|`, newlines, `<`, `&`). [`capped`] keeps a summary
//! under GitHub's 1 MiB limit per step.

use std::fmt::Write as _;
use std::io::Write;

use crate::data::Unit;
use crate::escape;
use crate::findings::Finding;
use crate::loss::user::UserLossReport;
use crate::report::junit::records_text;
use crate::report::table::{aggregate_rows, formula_rows, probe_outcomes, FORMULA_COLUMNS};
use crate::report::{LintReport, Report, Verdict};

/// GitHub refuses a step summary of 1 MiB or more.
pub const SUMMARY_LIMIT: usize = 1024 * 1024;

/// Inline code: backticks cannot be escaped inside it, so a name holding one is shown as a cell.
fn code(text: &str) -> String {
    if text.contains('`') || text.contains('\n') {
        escape::markdown_cell(text)
    } else {
        format!("`{text}`")
    }
}

fn verdict_line(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => "**Verdict: pass** ✅",
        Verdict::Fail => "**Verdict: FAIL** ❌",
    }
}

fn findings(out: &mut String, path: &str, unit: Unit, findings: &[Finding]) {
    let _ = writeln!(out, "### Findings\n");
    if findings.is_empty() {
        let _ = writeln!(out, "No findings.\n");
        return;
    }
    let _ = writeln!(out, "| severity | code | message | first records |");
    let _ = writeln!(out, "|---|---|---|---|");
    for f in findings {
        let severity = if f.baselined {
            format!("{} (baselined)", f.severity)
        } else {
            f.severity.to_string()
        };
        let _ = writeln!(
            out,
            "| {severity} | `{}` | {} | {} |",
            f.code,
            escape::markdown_cell(&f.message),
            escape::markdown_cell(&records_text(path, unit, f))
        );
    }
    out.push('\n');
}

fn user_loss(out: &mut String, user: &UserLossReport) {
    let _ = writeln!(
        out,
        "### Your loss\n\n{}({}) over {} batches, {}: {}\n",
        code(&user.source),
        user.args.join(", "),
        user.batches,
        user.tolerance_phrase(),
        escape::markdown_cell(&user.verdict)
    );
    let _ = writeln!(out, "| {} |", FORMULA_COLUMNS.join(" | "));
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for row in formula_rows(user) {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} |",
            row.name,
            row.value,
            row.your_loss.as_deref().unwrap_or("n/a"),
            row.difference,
            row.worst_batch,
            row.matches
        );
    }
    out.push('\n');
    for (name, _, outcome) in probe_outcomes(user) {
        let outcome = outcome.words("**FAIL**", escape::markdown_cell);
        let _ = writeln!(out, "- probe {name}: {outcome}");
    }
    out.push('\n');
}

/// The `check` report as Markdown.
pub fn check(report: &Report) -> String {
    let d = &report.data;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## maskaudit check: {}\n",
        if report.verdict == Verdict::Pass {
            "pass"
        } else {
            "FAIL"
        }
    );
    let split = crate::report::table::target_split(d);
    let _ = writeln!(
        out,
        "{} on {}: {} rows in {} batches of up to {}, {} next-token positions, {} trained, {split}; mask from `{}`.\n",
        code(&report.model.path),
        code(&d.path),
        d.rows,
        d.batches,
        d.batch_size,
        d.positions,
        d.supervised_positions,
        d.mask_source
    );
    // A policy loss computes no cross-entropy aggregates: its own section instead.
    let policy = report
        .user_loss
        .as_ref()
        .and_then(super::policy_table::section);
    if let Some(section) = &policy {
        super::policy_table::markdown(&mut out, section);
        findings(&mut out, &d.path, d.records, &report.findings);
        let _ = writeln!(out, "{}", verdict_line(report.verdict));
        return out;
    }
    let _ = writeln!(out, "| aggregate | loss | vs masked | % | what it is |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for row in aggregate_rows(report) {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} |",
            row.name,
            row.value,
            row.delta,
            row.percent,
            escape::markdown_cell(row.what)
        );
    }
    out.push('\n');
    if let Some(user) = &report.user_loss {
        user_loss(&mut out, user);
    }
    findings(&mut out, &d.path, d.records, &report.findings);
    let _ = writeln!(out, "{}", verdict_line(report.verdict));
    out
}

/// The `lint` report as Markdown.
pub fn lint(report: &LintReport) -> String {
    let d = &report.data;
    let s = &report.statistics;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## maskaudit lint: {}\n",
        if report.verdict == Verdict::Pass {
            "pass"
        } else {
            "FAIL"
        }
    );
    let _ = writeln!(out, "{} ({})\n", code(&d.path), d.format.as_str());
    let _ = writeln!(out, "| statistic | value |");
    let _ = writeln!(out, "|---|---|");
    let trained = s
        .trained_fraction
        .map(|f| format!(" ({:.1}% of the targets outside padding)", f * 100.0))
        .unwrap_or_default();
    let rows: Vec<(&str, String)> = vec![
        ("rows", s.rows.to_string()),
        ("tokens", s.tokens.to_string()),
        ("mask from", format!("`{}`", s.mask_source)),
        (
            "trained targets",
            format!("{} of {}{trained}", s.trained_targets, s.targets),
        ),
        (
            "rows without a trained target",
            s.rows_without_trained_target.to_string(),
        ),
        (
            "padding",
            format!(
                "{} tokens in {} rows ({} left-padded), {} trained",
                s.padding.tokens, s.padding.rows, s.padding.left_padded_rows, s.padding.trained
            ),
        ),
    ];
    for (name, value) in rows {
        let _ = writeln!(out, "| {name} | {value} |");
    }
    out.push('\n');
    findings(&mut out, &d.path, d.records, &report.findings);
    let _ = writeln!(out, "{}", verdict_line(report.verdict));
    out
}

/// `summary` cut at a line boundary so that it stays under `limit` bytes, with a note saying so.
pub fn capped(summary: String, limit: usize) -> String {
    if summary.len() < limit {
        return summary;
    }
    const NOTE: &str = "\n_(truncated: a job summary is limited to 1 MiB; the full report is in the job's output)_\n";
    let mut end = limit.saturating_sub(NOTE.len() + 1);
    while !summary.is_char_boundary(end) {
        end -= 1;
    }
    let end = summary[..end].rfind('\n').map_or(0, |i| i + 1);
    let mut out = summary[..end].to_string();
    out.push_str(NOTE);
    out
}

pub fn write<W: Write>(out: &mut W, markdown: &str) -> std::io::Result<()> {
    out.write_all(markdown.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capped_summaries_end_on_a_line_with_a_note() {
        let long: String = (0..1000).map(|i| format!("| row {i} |\n")).collect();
        assert_eq!(capped(long.clone(), long.len() + 1), long);
        let short = capped(long.clone(), 500);
        assert!(short.len() < 500, "{}", short.len());
        assert!(short.ends_with("output)_\n"));
        let kept = short.split("\n_(truncated").next().unwrap();
        assert!(long.starts_with(kept) && kept.ends_with("|\n"));
    }
}
