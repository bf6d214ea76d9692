//! The section for a policy or preference loss (`user_loss.policy`), in the table, Markdown
//! and HTML reports alike: one list of labelled lines, rendered three ways.

use std::fmt::Write as _;
use std::io::Write;

use crate::loss::user::UserLossReport;

fn probe(p: &crate::loss::policy_aggregation::PolicyProbe) -> String {
    match p.passed {
        Some(true) => format!("passed: {}", p.note),
        Some(false) => format!("FAILED: {}", p.note),
        None => format!("not run: {}", p.note),
    }
}

/// What the section says: its heading, the loss's verdict, and (label, text) lines.
pub struct Section {
    pub heading: String,
    pub verdict: String,
    pub lines: Vec<(String, String)>,
}

/// The loss, its aggregation (or preference statistic), the length bias, the probes; None
/// for a cross-entropy loss.
pub fn section(user: &UserLossReport) -> Option<Section> {
    let p = user.policy.as_ref()?;
    let c = &p.classification;
    let mut lines: Vec<(String, String)> = vec![];
    let mut line = |label: &str, text: String| lines.push((label.to_string(), text));
    if p.kind == "policy" {
        let aggregation = c.aggregation.map_or("none recognised", |a| a.name());
        let mut extra = String::new();
        if let Some(k) = c.constant {
            extra.push_str(&format!(", constant C = {k}"));
        }
        if let Some(s) = c.scale.filter(|s| (s - 1.0).abs() > 1e-4) {
            extra.push_str(&format!(", scale {s:.4}"));
        }
        line("aggregation", format!("{aggregation}{extra}"));
        let exponent = |e: Option<f64>| e.map_or("n/a".to_string(), |e| format!("{e:.2}"));
        line(
            "length bias",
            format!(
                "sequence weight {} (exponent {}); per-token weight exponent {}",
                c.length_bias,
                exponent(c.sequence_weight_exponent),
                exponent(c.token_weight_exponent)
            ),
        );
        if let Some(d) = &p.data_pass {
            line(
                "data pass",
                format!(
                    "loss {}; |sequence weight| exponent under the data's advantages {}{}",
                    d.value.map_or("n/a".into(), |v| format!("{v:.6}")),
                    exponent(d.sequence_weight_exponent),
                    d.non_finite_line
                        .map_or(String::new(), |l| format!("; not finite from record {l}"))
                ),
            );
        }
    } else {
        line(
            "log-probs",
            p.preference_logps.unwrap_or("not recognised").to_string(),
        );
    }
    line(
        "masked weight",
        format!(
            "{:.2}% of |weight| on prompt, tool or padding tokens ({:.2}% padding)",
            p.max_masked_share * 100.0,
            p.max_padding_share * 100.0
        ),
    );
    line("NaN probe", probe(&p.nan_probe));
    line("padding probe", probe(&p.padding_probe));
    for s in &p.steps {
        lines.push((
            format!("step {}", s.index),
            format!(
                "{} micro-batches, {} tokens: total weight {:.4} (expected {:.4})",
                s.micro_batches, s.trained, s.total_weight, s.expected_weight
            ),
        ));
    }
    Some(Section {
        heading: format!(
            "your {} loss: {}({}) over {} batches",
            p.kind,
            user.source,
            user.args.join(", "),
            p.batches
        ),
        verdict: user.verdict.clone(),
        lines,
    })
}

/// The table renderer's section.
pub fn write<W: Write>(out: &mut W, user: &UserLossReport) -> std::io::Result<()> {
    let Some(s) = section(user) else {
        return Ok(());
    };
    writeln!(out, "{}", s.heading)?;
    writeln!(out, "{}", s.verdict)?;
    for (label, text) in &s.lines {
        writeln!(out, "  {label:<15}{text}")?;
    }
    writeln!(out)
}

/// The Markdown report's section.
pub fn markdown(out: &mut String, s: &Section) {
    use crate::escape::markdown_cell as cell;
    let _ = writeln!(
        out,
        "### Your loss\n\n{}: {}\n\n| | |\n|---|---|",
        cell(&s.heading),
        cell(&s.verdict)
    );
    for (label, text) in &s.lines {
        let _ = writeln!(out, "| {} | {} |", cell(label), cell(text));
    }
    out.push('\n');
}

/// The HTML report's section.
pub fn html(out: &mut String, s: &Section) {
    use crate::escape::html as escape;
    let _ = writeln!(
        out,
        "<h2>Your loss</h2>\n<p><code>{}</code>: <b>{}</b></p>\n<table class=\"policy\">",
        escape(&s.heading),
        escape(&s.verdict)
    );
    for (label, text) in &s.lines {
        let _ = writeln!(
            out,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(label),
            escape(text)
        );
    }
    out.push_str("</table>\n");
}
