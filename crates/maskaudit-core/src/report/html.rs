//! `--html FILE`: one self-contained HTML page per run (inline CSS, no script, nothing
//! fetched), for people: the verdict, the findings, a per-token view of the first
//! `--html-rows` rows, then the aggregates (`check`) or statistics (`lint`) and the user-loss
//! table when a loss was given.
//!
//! In the token view each token is a `<span class="tok …">` whose hover text (`title`) gives
//! its id, piece, loss and mask. Classes: `trained` / `untrained` (a target after the shift,
//! or not; `first` for a row's first token, which no position predicts), `pad` for trailing
//! padding, and `pad in-loss` (red) for padding that is trained or, with a loss, that the
//! user's loss takes in (it matched `all_positions_mean`, the padding probe failed, or part of
//! its gradient reaches padding).
//! Under `check` a token's background shades with the loss predicting it, from white (0) to
//! orange (the largest loss shown). Rows are `<tr class="token-row">`.
//!
//! With a loss that takes logits, each token also shows the weight its cross-entropy has in the
//! user's loss (the gradient weight map); an untrained token with weight is red.

use std::fmt::Write as _;

use crate::escape;
use crate::findings::Finding;
use crate::lint::view::TokenText;
use crate::loss::user::UserLossReport;
use crate::report::junit::records_text;
use crate::report::table::{aggregate_rows, formula_rows, probe_outcomes, FORMULA_COLUMNS};
use crate::report::token_rows::{TokenCell, TokenRow};
use crate::report::{LintReport, Report, Verdict};

const STYLE: &str = r#"
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 0 0 6px; }
h2 { font-size: 17px; margin: 22px 0 8px; border-bottom: 1px solid #ddd; padding-bottom: 3px; }
.meta { color: #555; margin: 2px 0; }
.verdict { padding: 2px 10px; border-radius: 4px; color: #fff; font-size: 15px; vertical-align: middle; }
.verdict.pass { background: #1a7f37; } .verdict.fail { background: #cf222e; }
table.numbers { border-collapse: collapse; }
table.numbers td, table.numbers th { border: 1px solid #d0d7de; padding: 3px 9px; }
table.numbers th { background: #f6f8fa; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; font-family: ui-monospace, monospace; }
ul.findings { padding-left: 0; list-style: none; }
li.finding { margin: 4px 0; padding: 5px 9px; border-left: 4px solid #999; background: #f6f8fa; }
li.finding.error { border-color: #cf222e; } li.finding.warning { border-color: #bf8700; }
li.finding.info { border-color: #0969da; } li.finding.baselined { opacity: .7; }
.sev { font-weight: 600; } .records { color: #555; font-size: 12px; }
.legend span.tok { margin-right: 6px; }
.scale { display: inline-block; width: 160px; height: 12px; vertical-align: middle;
  background: linear-gradient(to right, rgba(255,128,0,0), rgba(255,128,0,1)); border: 1px solid #ccc; }
table.tokens { border-collapse: collapse; width: 100%; }
table.tokens th { width: 1%; text-align: left; vertical-align: top; white-space: nowrap; font-weight: normal;
  color: #555; padding: 6px 12px 6px 0; font-size: 12px; }
table.tokens td { padding: 6px 0; border-top: 1px solid #eee; line-height: 2.1; }
.tok { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; white-space: pre;
  padding: 1px 2px; margin: 0 1px; border: 1px solid #8c959f; border-radius: 3px; }
.tok.first { border-color: transparent; color: #555; }
.tok.untrained { color: #8c959f; border: 1px dashed #c6ccd2; }
.tok.trained { border-color: #1a7f37; }
.tok.pad { font-style: italic; }
.tok.in-loss { color: #b00; border: 2px solid #e00; background-color: rgba(255,0,0,.18); font-weight: 600; }
.weight { font-size: 10px; color: #0969da; vertical-align: sub; }
"#;

fn verdict_badge(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Pass => r#"<span class="verdict pass">pass</span>"#,
        Verdict::Fail => r#"<span class="verdict fail">FAIL</span>"#,
    }
}

fn head(out: &mut String, title: &str) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n",
        escape::html(title)
    );
}

fn findings(out: &mut String, path: &str, unit: crate::data::Unit, findings: &[Finding]) {
    out.push_str("<h2>Findings</h2>\n");
    if findings.is_empty() {
        out.push_str("<p>No findings.</p>\n");
        return;
    }
    out.push_str("<ul class=\"findings\">\n");
    for f in findings {
        let records = records_text(path, unit, f);
        let _ = writeln!(
            out,
            "<li class=\"finding {}{}\"><span class=\"sev\">{}[<code>{}</code>]</span>: {}{}</li>",
            f.severity,
            if f.baselined { " baselined" } else { "" },
            f.severity,
            f.code,
            escape::html(&f.message),
            if records.is_empty() {
                String::new()
            } else {
                format!(
                    " <span class=\"records\">first records: {}</span>",
                    escape::html(&records)
                )
            }
        );
    }
    out.push_str("</ul>\n");
}

fn user_loss(out: &mut String, user: &UserLossReport) {
    let _ = writeln!(
        out,
        "<h2>Your loss</h2>\n<p><code>{}({})</code> over {} batches, {}: <b>{}</b></p>",
        escape::html(&user.source),
        escape::html(&user.args.join(", ")),
        user.batches,
        escape::html(&user.tolerance_phrase()),
        escape::html(&user.verdict)
    );
    let _ = writeln!(
        out,
        "<table class=\"numbers user-loss\">\n<tr>{}</tr>",
        FORMULA_COLUMNS.map(|c| format!("<th>{c}</th>")).concat()
    );
    for row in formula_rows(user) {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            row.name,
            row.value,
            row.your_loss.as_deref().unwrap_or("n/a"),
            row.difference,
            row.worst_batch,
            row.matches
        );
    }
    out.push_str("</table>\n<ul>\n");
    for (name, _, outcome) in probe_outcomes(user) {
        let outcome = outcome.words("<b>FAIL</b>", escape::html);
        let _ = writeln!(out, "<li>probe {name}: {outcome}</li>");
    }
    out.push_str("</ul>\n");
}

/// The weight a token's cross-entropy has in the user's loss, as shown; nothing without one.
pub fn weight_text(cell: &TokenCell) -> Option<String> {
    cell.loss_weight.map(|w| format!("{w:.2e}"))
}

/// Weight below which an untrained token is taken to receive none (a masked loss leaves it at
/// exactly 0; f32 gradients round around that).
const NO_WEIGHT: f32 = 1e-9;

/// How the token view marks padding and shades losses.
pub struct TokenViewOptions {
    /// The user's loss takes padding in: padding is marked `in-loss` even where untrained.
    pub padding_in_loss: bool,
}

fn token_view(out: &mut String, rows: &[TokenRow], text: &dyn TokenText, opts: &TokenViewOptions) {
    let max_loss = rows
        .iter()
        .flat_map(|r| r.tokens.iter().filter_map(|c| c.loss))
        .filter(|l| l.is_finite())
        .fold(0f32, f32::max);
    let has_losses = rows
        .iter()
        .any(|r| r.tokens.iter().any(|c| c.loss.is_some()));
    let _ = writeln!(out, "<h2>Tokens: the first {} rows</h2>", rows.len());
    out.push_str("<p class=\"legend\">");
    out.push_str("<span class=\"tok trained\">trained</span><span class=\"tok untrained\">untrained</span><span class=\"tok untrained pad\">padding</span><span class=\"tok pad in-loss\">untrained, yet in the loss</span>");
    if has_losses {
        let _ = write!(
            out,
            " loss predicting the token: 0 <span class=\"scale\"></span> {max_loss:.3}"
        );
    }
    out.push_str(" (hover a token for its id, piece, loss and mask)</p>\n");
    out.push_str("<table class=\"tokens\">\n");
    for row in rows {
        let ids: Vec<i64> = row.tokens.iter().map(|c| c.id).collect();
        let pieces = text.pieces(&ids);
        let trained = row.tokens.iter().filter(|c| c.trained).count();
        let targets = row.tokens.iter().filter(|c| c.target).count();
        let padding = row.tokens.iter().filter(|c| c.padding).count();
        let _ = write!(
            out,
            "<tr class=\"token-row\" data-record=\"{}\"><th>{}<br>{} tokens, {trained} of {targets} trained{}</th><td>",
            row.record.n,
            escape::html(&row.record.named()),
            row.tokens.len(),
            if padding > 0 {
                format!(", {padding} padding")
            } else {
                String::new()
            }
        );
        for (i, (cell, piece)) in row.tokens.iter().zip(&pieces).enumerate() {
            if i > 0 {
                out.push_str(&escape::html(text.separator()));
            }
            token(out, cell, piece, max_loss, opts);
        }
        out.push_str("</td></tr>\n");
    }
    out.push_str("</table>\n");
}

fn token(out: &mut String, cell: &TokenCell, piece: &str, max_loss: f32, opts: &TokenViewOptions) {
    let mut classes = vec!["tok"];
    classes.push(match (cell.target, cell.trained) {
        (false, _) => "first",
        (true, true) => "trained",
        (true, false) => "untrained",
    });
    // An untrained token the user's loss gives weight to is trained after all: red.
    let weighted =
        cell.target && !cell.trained && cell.loss_weight.is_some_and(|w| w.abs() > NO_WEIGHT);
    if cell.padding {
        classes.push("pad");
    }
    if (cell.padding && (cell.trained || (opts.padding_in_loss && cell.target))) || weighted {
        classes.push("in-loss");
    }
    let shown = escape::terminal(piece);
    let mut title = format!("id {}\npiece {:?}", cell.id, piece);
    match cell.loss {
        Some(l) => {
            let _ = write!(title, "\nloss {l:.4}");
        }
        None if cell.target => {}
        None => title.push_str("\nloss none (no position predicts the first token)"),
    }
    if cell.target {
        let _ = write!(
            title,
            "\nmask {}{}",
            u8::from(cell.trained),
            if cell.padding { " (padding)" } else { "" }
        );
    }
    let weight = weight_text(cell);
    if let Some(w) = &weight {
        let _ = write!(title, "\nweight {w}");
    }
    let style = match cell.loss {
        Some(l) if l.is_finite() && max_loss > 0.0 && !classes.contains(&"in-loss") => {
            format!(
                " style=\"background-color: rgba(255,128,0,{:.3})\"",
                (l / max_loss).clamp(0.0, 1.0)
            )
        }
        _ => String::new(),
    };
    let _ = write!(
        out,
        "<span class=\"{}\" title=\"{}\" data-id=\"{}\"{style}>{}</span>",
        classes.join(" "),
        escape::html(&title),
        cell.id,
        escape::html(if shown.is_empty() { "\u{b7}" } else { &shown })
    );
    if let Some(w) = weight {
        let _ = write!(out, "<span class=\"weight\">{}</span>", escape::html(&w));
    }
}

/// The `check` page: `rows` are the report's first rows with their losses.
pub fn check(report: &Report, text: &dyn TokenText) -> String {
    let d = &report.data;
    let mut out = String::new();
    head(
        &mut out,
        &format!("maskaudit check: {} on {}", report.model.path, d.path),
    );
    let _ = writeln!(
        out,
        "<h1>maskaudit check {}</h1>\n<p class=\"meta\"><code>{}</code> on <code>{}</code>: {} rows in {} batches of up to {}, {} next-token positions, {} trained; {}; mask from <code>{}</code></p>",
        verdict_badge(report.verdict),
        escape::html(&report.model.path),
        escape::html(&d.path),
        d.rows,
        d.batches,
        d.batch_size,
        d.positions,
        d.supervised_positions,
        escape::html(&crate::report::table::target_split(d)),
        escape::html(&d.mask_source)
    );
    findings(&mut out, &d.path, d.records, &report.findings);
    // A policy loss computes no cross-entropy aggregates and no per-token view: its own section instead.
    if let Some(section) = report
        .user_loss
        .as_ref()
        .and_then(super::policy_table::section)
    {
        super::policy_table::html(&mut out, &section);
        out.push_str("</body>\n</html>\n");
        return out;
    }
    let padding_in_loss = report.user_loss.as_ref().is_some_and(|u| {
        u.matched == Some("all_positions_mean")
            || u.probes.padding.passed == Some(false)
            || u.gradient.max_padding_share > 0.0
    });
    token_view(
        &mut out,
        &report.token_rows,
        text,
        &TokenViewOptions { padding_in_loss },
    );
    out.push_str("<h2>Aggregates</h2>\n<table class=\"numbers aggregates\">\n<tr><th>aggregate</th><th>loss</th><th>vs masked</th><th>%</th><th>what it is</th></tr>\n");
    for row in aggregate_rows(report) {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            row.name,
            row.value,
            row.delta,
            row.percent,
            escape::html(row.what)
        );
    }
    out.push_str("</table>\n");
    if let Some(user) = &report.user_loss {
        user_loss(&mut out, user);
    }
    out.push_str("</body>\n</html>\n");
    out
}

/// The `lint` page: the mask view only (no model, no losses).
pub fn lint(report: &LintReport, rows: &[TokenRow], text: &dyn TokenText) -> String {
    let d = &report.data;
    let s = &report.statistics;
    let mut out = String::new();
    head(&mut out, &format!("maskaudit lint: {}", d.path));
    let _ = writeln!(
        out,
        "<h1>maskaudit lint {}</h1>\n<p class=\"meta\"><code>{}</code> ({})</p>",
        verdict_badge(report.verdict),
        escape::html(&d.path),
        d.format.as_str()
    );
    findings(&mut out, &d.path, d.records, &report.findings);
    token_view(
        &mut out,
        rows,
        text,
        &TokenViewOptions {
            padding_in_loss: false,
        },
    );
    out.push_str("<h2>Statistics</h2>\n<table class=\"numbers statistics\">\n");
    let trained = s
        .trained_fraction
        .map(|f| format!(" ({:.1}% of the targets outside padding)", f * 100.0))
        .unwrap_or_default();
    for (name, value) in [
        ("rows", s.rows.to_string()),
        ("tokens", s.tokens.to_string()),
        ("mask from", s.mask_source.clone()),
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
    ] {
        let _ = writeln!(
            out,
            "<tr><th>{name}</th><td>{}</td></tr>",
            escape::html(&value)
        );
    }
    out.push_str("</table>\n");
    out.push_str("</body>\n</html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Pos;
    use crate::lint::view::Ids;

    fn cell(id: i64, target: bool, trained: bool, padding: bool, loss: Option<f32>) -> TokenCell {
        TokenCell {
            id,
            target,
            trained,
            padding,
            loss,
            loss_weight: None,
        }
    }

    #[test]
    fn tokens_carry_classes_hover_text_and_their_weight() {
        let rows = vec![TokenRow {
            record: Pos::line(4),
            tokens: vec![
                cell(1, false, false, false, None),
                cell(7, true, true, false, Some(2.0)),
                cell(0, true, false, true, Some(1.0)),
            ],
        }];
        let mut out = String::new();
        token_view(
            &mut out,
            &rows,
            &Ids,
            &TokenViewOptions {
                padding_in_loss: true,
            },
        );
        assert_eq!(out.matches("class=\"token-row\"").count(), 1);
        assert!(
            out.contains("<span class=\"tok trained\" title=\"id 7\npiece &quot;7&quot;\nloss 2.0000\nmask 1\" data-id=\"7\" style=\"background-color: rgba(255,128,0,1.000)\">7</span>"),
            "{out}"
        );
        assert!(out.contains("class=\"tok untrained pad in-loss\""), "{out}");
        assert!(!out.contains("class=\"weight\""));

        let mut weighted = rows.clone();
        weighted[0].tokens[1].loss_weight = Some(0.25);
        let mut out = String::new();
        token_view(
            &mut out,
            &weighted,
            &Ids,
            &TokenViewOptions {
                padding_in_loss: false,
            },
        );
        assert!(
            out.contains("<span class=\"weight\">2.50e-1</span>"),
            "{out}"
        );
        assert!(out.contains("class=\"tok untrained pad\""), "{out}");

        // An untrained token that the loss weighs is red, padding or not.
        weighted[0].tokens[2].loss_weight = Some(0.1);
        weighted[0].tokens[2].padding = false;
        let mut out = String::new();
        token_view(
            &mut out,
            &weighted,
            &Ids,
            &TokenViewOptions {
                padding_in_loss: false,
            },
        );
        assert!(out.contains("class=\"tok untrained in-loss\""), "{out}");
    }
}
