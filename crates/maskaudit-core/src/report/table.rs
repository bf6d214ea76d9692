//! The human-readable report: a summary, a comparison table and the findings.

use std::io::Write;

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, CellAlignment, Table};

use crate::findings::Finding;
use crate::loss::diagnosis::ProbeResult;
use crate::loss::steps::StepReport;
use crate::loss::user::UserLossReport;
use crate::loss::weights::GradientSummary;
use crate::report::{DataSummary, ModelInfo, Report, Verdict};

/// Each aggregate, with what it is and where it comes from.
pub(crate) const AGGREGATES: &[(&str, &str)] = &[
    (
        "masked_token_mean",
        "Σℓm/Σm over trained targets: the correct loss",
    ),
    (
        "all_positions_mean",
        "Σℓ/N: padding included (reduce before mask)",
    ),
    (
        "masked_sum_over_all_positions",
        "Σℓm/N: divided by numel, not by Σm",
    ),
    (
        "sequence_mean",
        "mean of row means: short rows overweighted",
    ),
    (
        "batch_mean_of_means",
        "mean of batch means: accumulation without token counts",
    ),
    (
        "trained_and_padding_mean",
        "padding targets not masked, prompts masked",
    ),
];

/// One row of the aggregates table, as every renderer prints it.
pub(crate) struct AggregateRow {
    pub name: &'static str,
    /// The loss with six decimals, or `n/a`.
    pub value: String,
    /// Against the masked token mean: `+0.123456` and `+12.34%`; empty for the mean itself.
    pub delta: String,
    pub percent: String,
    pub what: &'static str,
}

/// The aggregates table's rows: the table, Markdown and HTML writers share them.
pub(crate) fn aggregate_rows(report: &Report) -> Vec<AggregateRow> {
    let reference = report.losses.masked_token_mean;
    AGGREGATES
        .iter()
        .map(|&(name, what)| {
            let value = value_of(report, name);
            let (delta, percent) = match (value, reference) {
                (Some(v), Some(r)) if name != "masked_token_mean" => (
                    format!("{:+.6}", v - r),
                    format!(
                        "{:+.2}%",
                        crate::loss::aggregate::relative_change(v, r) * 100.0
                    ),
                ),
                _ => (String::new(), String::new()),
            };
            AggregateRow {
                name,
                value: value
                    .map(|v| format!("{v:.6}"))
                    .unwrap_or_else(|| "n/a".into()),
                delta,
                percent,
                what,
            }
        })
        .collect()
}

/// One formula's row of the user-loss table, as every renderer prints it.
pub(crate) struct FormulaRow {
    pub name: &'static str,
    pub value: String,
    /// The user's loss; `None` when it has no value (each writer says so its own way).
    pub your_loss: Option<String>,
    pub difference: String,
    pub worst_batch: String,
    pub matches: &'static str,
}

/// The user-loss table's columns, in every writer.
pub(crate) const FORMULA_COLUMNS: [&str; 6] = [
    "formula",
    "value",
    "your loss",
    "difference",
    "worst batch",
    "match",
];

/// How a user-loss probe ended, as every renderer words it.
pub(crate) enum ProbeOutcome<'a> {
    /// Passed; the largest relative change of the loss.
    Pass(f64),
    Fail(f64),
    /// Why it did not run.
    NotRun(&'a str),
}

impl ProbeOutcome<'_> {
    /// The outcome as the HTML and Markdown reports word it: `fail` is their bold FAIL,
    /// `escape` makes the note safe in their markup.
    pub(crate) fn words(&self, fail: &str, escape: impl Fn(&str) -> String) -> String {
        match self {
            ProbeOutcome::Pass(c) => format!("moved {} at most: pass", percent(*c)),
            ProbeOutcome::Fail(c) => format!("moved {}: {fail}", percent(*c)),
            ProbeOutcome::NotRun(note) => format!("not run: {}", escape(note)),
        }
    }
}

fn outcome(p: &ProbeResult) -> ProbeOutcome<'_> {
    match (p.passed, p.max_relative_change) {
        (Some(true), Some(c)) => ProbeOutcome::Pass(c),
        (Some(false), Some(c)) => ProbeOutcome::Fail(c),
        _ => ProbeOutcome::NotRun(&p.note),
    }
}

/// The user-loss probes, named, in the order every renderer lists them, with their outcomes.
pub(crate) fn probe_outcomes(
    user: &UserLossReport,
) -> [(&'static str, &ProbeResult, ProbeOutcome<'_>); 2] {
    let (padding, masked) = (&user.probes.padding, &user.probes.masked_logits);
    [
        ("padding", padding, outcome(padding)),
        ("masked logits", masked, outcome(masked)),
    ]
}

/// The user-loss table's rows: the table, Markdown and HTML writers share them.
pub(crate) fn formula_rows(user: &UserLossReport) -> Vec<FormulaRow> {
    let na = || "n/a".to_string();
    user.hypotheses
        .iter()
        .map(|h| FormulaRow {
            name: h.name,
            value: h.value.map(|v| format!("{v:.6}")).unwrap_or_else(na),
            your_loss: user.value.map(|v| format!("{v:.6}")),
            difference: match (user.value, h.value) {
                // Rounds away the sign of a difference that prints as zero.
                (Some(u), Some(v)) if (u - v).abs() < 5e-7 => "0".into(),
                (Some(u), Some(v)) => format!("{:+.6}", u - v),
                _ => na(),
            },
            worst_batch: h.max_relative_error.map(percent).unwrap_or_else(na),
            matches: if h.matches { "yes" } else { "" },
        })
        .collect()
}

pub(crate) fn value_of(report: &Report, name: &str) -> Option<f64> {
    let l = &report.losses;
    match name {
        "masked_token_mean" => l.masked_token_mean,
        "all_positions_mean" => l.all_positions_mean,
        "masked_sum_over_all_positions" => l.masked_sum_over_all_positions,
        "sequence_mean" => l.sequence_mean,
        "batch_mean_of_means" => l.batch_mean_of_means,
        "trained_and_padding_mean" => l.trained_and_padding_mean,
        _ => None,
    }
}

/// The `check` report as a table for people: the header (data, model, consistency), the
/// aggregates, the user's loss and the steps when present, the findings and the verdict.
pub fn write<W: Write>(out: &mut W, report: &Report) -> std::io::Result<()> {
    let model = match &report.ranks {
        Some(_) if report.model.path.is_empty() => "the recorded per-token losses",
        _ => &report.model.path,
    };
    writeln!(out, "maskaudit check: {model} on {}", report.data.path)?;
    writeln!(out)?;
    write_data(out, report)?;
    if let Some(ranks) = &report.ranks {
        super::ranks_table::write(out, ranks)?;
    }
    if !report.model.path.is_empty() {
        write_model(out, &report.model)?;
    }
    // A policy loss computes no cross-entropy aggregates: its own section says it all.
    if let Some(policy) = report.user_loss.as_ref().filter(|u| u.policy.is_some()) {
        super::policy_table::write(out, policy)?;
        write_findings(out, &report.findings)?;
        return write_verdict(out, report.verdict);
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec!["aggregate", "loss", "vs masked", "%", "what it is"]);
    for row in aggregate_rows(report) {
        table.add_row(vec![
            Cell::new(row.name),
            Cell::new(row.value).set_alignment(CellAlignment::Right),
            Cell::new(row.delta).set_alignment(CellAlignment::Right),
            Cell::new(row.percent).set_alignment(CellAlignment::Right),
            Cell::new(row.what),
        ]);
    }
    writeln!(out, "{table}")?;
    writeln!(out)?;
    if let Some(user) = &report.user_loss {
        write_user_loss(out, user)?;
    }
    if let Some(steps) = &report.steps {
        write_steps(out, steps)?;
    }
    write_findings(out, &report.findings)?;
    write_verdict(out, report.verdict)
}

/// How the targets divide, in words every renderer prints: "padding 36.61% of targets (12
/// trained), untrained real tokens 4.00%".
pub(crate) fn target_split(d: &DataSummary) -> String {
    let share = |n: u64| {
        if d.positions == 0 {
            "n/a".to_string()
        } else {
            format!("{:.2}%", n as f64 / d.positions as f64 * 100.0)
        }
    };
    let trained = match d.padding_trained_positions {
        0 => String::new(),
        n if n == d.padding_target_positions => " (all trained)".to_string(),
        n => format!(" ({n} trained)"),
    };
    format!(
        "padding {} of targets{trained}, untrained real tokens {}",
        share(d.padding_target_positions),
        share(d.untrained_real_target_positions)
    )
}

fn write_data<W: Write>(out: &mut W, report: &Report) -> std::io::Result<()> {
    let d = &report.data;
    let pad = d
        .pad_id
        .map(|p| format!(", padded with id {p}"))
        .unwrap_or_default();
    writeln!(
        out,
        "  data   {} rows in {} batches of up to {}{pad}; {} next-token positions, {} trained; {}; mask from {}",
        d.rows,
        d.batches,
        d.batch_size,
        d.positions,
        d.supervised_positions,
        target_split(d),
        d.mask_source
    )?;
    if let Some(c) = &d.capture {
        let trainer = c
            .trainer_token_mean
            .map(|m| format!("; the trainer's loss as a token mean {m:.6}"))
            .unwrap_or_default();
        writeln!(
            out,
            "  run    a captured run ({}): {} micro-batches in {} steps, batched as captured{trainer}",
            c.source, c.micro_batches, c.steps
        )?;
        if let Some(verdict) = &c.trainer_verdict {
            writeln!(out, "         {verdict}")?;
        }
    }
    if let Some(l) = report.statistics.length {
        writeln!(
            out,
            "  rows   length min {}, median {}, p95 {}, max {}; without a trained target: {}",
            l.min, l.median, l.p95, l.max, report.statistics.rows_without_trained_target
        )?;
    }
    Ok(())
}

fn write_model<W: Write>(out: &mut W, m: &ModelInfo) -> std::io::Result<()> {
    let arch = m
        .architecture
        .as_deref()
        .map(|a| format!("{a}, "))
        .unwrap_or_default();
    let dtype = if m.run_dtype == m.dtype {
        m.dtype.clone()
    } else {
        format!("{} run in {}", m.dtype, m.run_dtype)
    };
    let dtype = if m.tf32 {
        format!("{dtype} (TF32)")
    } else {
        dtype
    };
    writeln!(
        out,
        "  model  {arch}{}, vocabulary {} on {}; {} returns logits as {}",
        dtype,
        m.vocab_size,
        m.device,
        forward_display(&m.forward_args),
        m.output
    )?;
    writeln!(out, "         arguments {}", m.forward_args_note)?;
    if let Some(line) = consistency_line(&m.consistency) {
        writeln!(out, "         consistency: {line}")?;
    }
    writeln!(out)
}

/// The consistency probe's line: what it compared (a call that failed or was skipped is in the
/// note), or that it compared nothing; `None` when it did not run.
fn consistency_line(c: &crate::model::consistency::Consistency) -> Option<String> {
    if !c.ran {
        return None;
    }
    let note = if c.note.is_empty() {
        String::new()
    } else {
        format!("; {}", c.note)
    };
    if !c.compared() {
        return Some(format!("not checked{note}"));
    }
    if c.passed() {
        let checked: Vec<&str> = [
            (c.padding_difference, "padding appended"),
            (c.row_difference, "rows alone"),
        ]
        .iter()
        .filter(|(d, _)| d.is_some())
        .map(|&(_, what)| what)
        .collect();
        return Some(format!(
            "logits at real tokens unchanged (within {:.0e}) with {}, up to {} positions{note}",
            c.tolerance,
            checked.join(" and "),
            c.longest_length
        ));
    }
    let show = |d: Option<f64>| {
        d.map(|d| format!("{d:.1e}"))
            .unwrap_or_else(|| "not run".into())
    };
    Some(format!(
        "FAILED: logits at real tokens moved by {} with padding appended, {} with rows alone (tolerance {:.0e}), up to {} positions{note}",
        show(c.padding_difference),
        show(c.row_difference),
        c.tolerance,
        c.longest_length
    ))
}

pub(crate) fn forward_display(args: &[crate::model::ForwardArg]) -> String {
    let names: Vec<&str> = args.iter().map(|a| a.name()).collect();
    format!("forward({})", names.join(", "))
}

fn write_user_loss<W: Write>(out: &mut W, user: &UserLossReport) -> std::io::Result<()> {
    writeln!(
        out,
        "your loss: {}({}) over {} batches, {}",
        user.source,
        user.args.join(", "),
        user.batches,
        user.tolerance_phrase()
    )?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(FORMULA_COLUMNS.to_vec());
    for row in formula_rows(user) {
        table.add_row(vec![
            Cell::new(row.name),
            Cell::new(row.value).set_alignment(CellAlignment::Right),
            Cell::new(row.your_loss.unwrap_or_default()).set_alignment(CellAlignment::Right),
            Cell::new(row.difference).set_alignment(CellAlignment::Right),
            Cell::new(row.worst_batch).set_alignment(CellAlignment::Right),
            Cell::new(row.matches),
        ]);
    }
    writeln!(out, "{table}")?;
    writeln!(out, "{}", user.verdict)?;
    for (name, probe, outcome) in probe_outcomes(user) {
        let outcome = match outcome {
            ProbeOutcome::Pass(c) => format!(
                "moved {} at most over {} batches: pass",
                percent(c),
                probe.batches
            ),
            ProbeOutcome::Fail(c) => {
                format!("moved {} over {} batches: FAIL", percent(c), probe.batches)
            }
            ProbeOutcome::NotRun(note) => format!("not run: {note}"),
        };
        writeln!(out, "probe {name}: {outcome}")?;
    }
    write_gradient(out, &user.gradient)?;
    writeln!(out)
}

/// The gradient weight map in three lines: what the weights follow, where they go, and what is
/// not cross-entropy.
fn write_gradient<W: Write>(out: &mut W, g: &GradientSummary) -> std::io::Result<()> {
    if g.batches.is_empty() {
        return writeln!(out, "gradient: not weighed: {}", g.note);
    }
    let follows = match (g.matched, g.scale) {
        (Some(m), Some(c)) if (c - 1.0).abs() <= 1e-3 => format!("follow {m}"),
        (Some(m), Some(c)) => format!("follow {m} scaled by {c:.4}"),
        _ => "follow no single normalisation".into(),
    };
    writeln!(
        out,
        "gradient: per-token weights over {} batches {follows}; {} of the gradient trains untrained targets ({} padding) in the worst batch",
        g.batches.len(),
        percent(g.max_untrained_share),
        percent(g.max_padding_share)
    )?;
    writeln!(
        out,
        "          largest residual (not next-token cross-entropy) {:.1e}, {:.2}× what float32 rounding may leave",
        g.max_residual, g.max_residual_excess
    )
}

/// The training-step simulation: per formula, its worst step.
fn write_steps<W: Write>(out: &mut W, steps: &StepReport) -> std::io::Result<()> {
    let dropped = if steps.dropped_micro_batches > 0 {
        format!(
            "; {} micro-batches of the partial last step dropped",
            steps.dropped_micro_batches
        )
    } else {
        String::new()
    };
    writeln!(
        out,
        "training steps: {} steps of {} rank(s) × {} micro-batch(es) of {} rows{dropped}",
        steps.steps.len(),
        steps.world_size,
        steps.accum,
        steps.micro_batch_rows
    )?;
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    table.set_header(vec![
        "formula",
        "heaviest token vs 1/N",
        "max/min",
        "distance from uniform",
        "weight sum",
        "worst step",
        "logged loss",
    ]);
    for f in &steps.formulas {
        let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
        table.add_row(vec![
            Cell::new(f.formula.name()),
            right(format!("{:.2}×", f.worst_max_relative_weight)),
            right(
                f.worst_max_min_ratio
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "n/a".into()),
            ),
            right(format!("{:.4}", f.worst_total_variation)),
            right(if (f.max_total_weight - f.min_total_weight).abs() < 5e-4 {
                format!("{:.3}", f.min_total_weight)
            } else {
                format!("{:.3}..{:.3}", f.min_total_weight, f.max_total_weight)
            }),
            right(f.worst_step.to_string()),
            right(
                f.mean_logged_loss
                    .map(|l| format!("{l:.6}"))
                    .unwrap_or_else(|| "n/a".into()),
            ),
        ]);
    }
    writeln!(out, "{table}")?;
    writeln!(out)
}

/// A relative error as a percentage, to two decimals: below 0.01% it shows as "<0.01%".
pub(crate) fn percent(e: f64) -> String {
    if e < 1e-4 {
        "<0.01%".into()
    } else {
        format!("{:.2}%", e * 100.0)
    }
}

pub fn write_findings<W: Write>(out: &mut W, findings: &[Finding]) -> std::io::Result<()> {
    for f in findings {
        writeln!(out, "{}[{}]: {}", f.severity, f.code, f.message)?;
    }
    if !findings.is_empty() {
        writeln!(out)?;
    }
    Ok(())
}

pub fn write_verdict<W: Write>(out: &mut W, verdict: Verdict) -> std::io::Result<()> {
    match verdict {
        Verdict::Pass => writeln!(out, "verdict: pass"),
        Verdict::Fail => writeln!(out, "verdict: FAIL"),
    }
}

#[cfg(test)]
mod tests {
    use super::consistency_line;
    use crate::model::consistency::Consistency;

    #[test]
    fn the_consistency_line_names_only_what_the_probe_compared() {
        let both = Consistency {
            ran: true,
            longest_length: 40,
            padding_difference: Some(0.0),
            row_difference: Some(0.0),
            tolerance: 1e-4,
            ..Default::default()
        };
        assert_eq!(
            consistency_line(&both).unwrap(),
            "logits at real tokens unchanged (within 1e-4) with padding appended and rows alone, up to 40 positions"
        );
        let alone = Consistency {
            padding_difference: None,
            note: "no padding appended".into(),
            ..both.clone()
        };
        assert_eq!(
            consistency_line(&alone).unwrap(),
            "logits at real tokens unchanged (within 1e-4) with rows alone, up to 40 positions; no padding appended"
        );
        let none = Consistency::not_checked(1e-4, "out of memory".into());
        assert_eq!(
            consistency_line(&none).unwrap(),
            "not checked; out of memory"
        );
        // A probe that compared nothing is not reported as a check that passed (JUnit).
        assert!(both.compared() && alone.compared() && !none.compared());
        assert_eq!(consistency_line(&Consistency::default()), None);
    }
}
