//! The human-readable `lint` report: what was read, the statistics, the findings.

use std::io::Write;

use crate::lint::LintStats;
use crate::report::LintReport;

use super::table::{write_findings, write_verdict};

pub fn write<W: Write>(out: &mut W, report: &LintReport) -> std::io::Result<()> {
    let d = &report.data;
    writeln!(out, "maskaudit lint: {} ({})", d.path, d.format.as_str())?;
    writeln!(out)?;
    write_statistics(out, &report.statistics)?;
    writeln!(out)?;
    write_findings(out, &report.findings)?;
    write_verdict(out, report.verdict)
}

/// `1 row`, `2 rows`.
fn count(n: u64, noun: &str) -> String {
    match (n, noun.ends_with("ch")) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

fn percent(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

/// One line a topic, each indented by two spaces; topics with nothing to say are left out.
/// Here the rows, their lengths and how much of them is trained; then `write_structure`.
pub fn write_statistics<W: Write>(out: &mut W, s: &LintStats) -> std::io::Result<()> {
    writeln!(
        out,
        "  rows      {}, {}; mask from {}",
        count(s.rows, "row"),
        count(s.tokens, "token"),
        s.mask_source
    )?;
    if let Some(l) = s.length {
        writeln!(
            out,
            "  length    min {}, median {}, p95 {}, max {}, mean {:.1}",
            l.min, l.median, l.p95, l.max, l.mean
        )?;
    }
    if let (Some(c), true) = (s.content_length, s.padding.rows > 0) {
        writeln!(
            out,
            "  content   min {}, median {}, p95 {}, max {}, mean {:.1} (without padding)",
            c.min, c.median, c.p95, c.max, c.mean
        )?;
    }
    let outside = s
        .trained_fraction
        .map(|f| {
            format!(
                "; {} of the targets outside padding are trained",
                percent(f)
            )
        })
        .unwrap_or_default();
    writeln!(
        out,
        "  trained   {} of {} target positions{outside}",
        s.trained_targets, s.targets
    )?;
    if let Some(r) = s.trained_fraction_per_row {
        writeln!(
            out,
            "  per row   trained min {}, median {}, mean {}, max {}; without a trained target: {}",
            percent(r.min),
            percent(r.median),
            percent(r.mean),
            percent(r.max),
            s.rows_without_trained_target
        )?;
    }
    write_structure(out, s)
}

/// Padding, packing, labels, disagreement, EOS and batching: the topics about how the rows
/// were built.
fn write_structure<W: Write>(out: &mut W, s: &LintStats) -> std::io::Result<()> {
    if s.padding.rows > 0 {
        writeln!(
            out,
            "  padding   {} in {}{}, {} of them trained",
            count(s.padding.tokens, "padding token"),
            count(s.padding.rows, "row"),
            if s.padding.left_padded_rows > 0 {
                format!(" ({} left-padded)", s.padding.left_padded_rows)
            } else {
                String::new()
            },
            s.padding.trained
        )?;
    }
    if s.packing.rows > 0 {
        let p = &s.packing;
        writeln!(
            out,
            "  packing   {}, {}; {} of {} document starts trained",
            count(p.rows, "packed row"),
            count(p.documents, "document"),
            p.supervised_boundaries,
            p.boundaries
        )?;
    }
    if let Some(l) = s.labels {
        writeln!(
            out,
            "  labels    in {}: of {} labelled positions {} equal their token, {} the next one; {} negative other than -100",
            count(l.rows, "row"),
            l.compared,
            l.same_position,
            l.next_position,
            l.unexpected_negative
        )?;
    }
    if s.disagreeing_positions > 0 {
        writeln!(
            out,
            "  disagree  {} target positions where loss_mask, labels and attention_mask differ",
            s.disagreeing_positions
        )?;
    }
    if let Some(e) = s.eos {
        writeln!(
            out,
            "  eos       id {}: {} targets, {} trained",
            e.id, e.targets, e.trained
        )?;
    }
    if let Some(b) = s.batching {
        writeln!(
            out,
            "  batching  batches of {} in file order: {}, padding would add {} ({} of {} positions)",
            b.batch_size,
            count(b.batches, "batch"),
            percent(b.padding_fraction),
            b.added_padding,
            b.positions
        )?;
    }
    Ok(())
}
