//! The table renderer's section for a policy or preference loss (`user_loss.policy`).

use std::io::Write;

use crate::loss::user::UserLossReport;

fn probe(p: &crate::loss::policy_aggregation::PolicyProbe) -> String {
    match p.passed {
        Some(true) => format!("passed: {}", p.note),
        Some(false) => format!("FAILED: {}", p.note),
        None => format!("not run: {}", p.note),
    }
}

/// The loss, its aggregation (or preference statistic), the length bias, the probes.
pub fn write<W: Write>(out: &mut W, user: &UserLossReport) -> std::io::Result<()> {
    let Some(p) = &user.policy else {
        return Ok(());
    };
    let c = &p.classification;
    writeln!(
        out,
        "your {} loss: {}({}) over {} batches",
        p.kind,
        user.source,
        user.args.join(", "),
        p.batches
    )?;
    writeln!(out, "{}", user.verdict)?;
    if p.kind == "policy" {
        let aggregation = c.aggregation.map_or("none recognised", |a| a.name());
        let mut extra = String::new();
        if let Some(k) = c.constant {
            extra.push_str(&format!(", constant C = {k}"));
        }
        if let Some(s) = c.scale.filter(|s| (s - 1.0).abs() > 1e-4) {
            extra.push_str(&format!(", scale {s:.4}"));
        }
        writeln!(out, "  aggregation    {aggregation}{extra}")?;
        let exponent = |e: Option<f64>| e.map_or("n/a".to_string(), |e| format!("{e:.2}"));
        writeln!(
            out,
            "  length bias    sequence weight {} (exponent {}); per-token weight exponent {}",
            c.length_bias,
            exponent(c.sequence_weight_exponent),
            exponent(c.token_weight_exponent)
        )?;
        if let Some(d) = &p.data_pass {
            writeln!(
                out,
                "  data pass      loss {}; |sequence weight| exponent under the data's advantages {}{}",
                d.value.map_or("n/a".into(), |v| format!("{v:.6}")),
                exponent(d.sequence_weight_exponent),
                d.non_finite_line
                    .map_or(String::new(), |l| format!("; not finite from record {l}"))
            )?;
        }
    } else {
        writeln!(
            out,
            "  log-probs      {}",
            p.preference_logps.unwrap_or("not recognised")
        )?;
    }
    writeln!(
        out,
        "  masked weight  {:.2}% of |weight| on prompt, tool or padding tokens ({:.2}% padding)",
        p.max_masked_share * 100.0,
        p.max_padding_share * 100.0
    )?;
    writeln!(out, "  NaN probe      {}", probe(&p.nan_probe))?;
    writeln!(out, "  padding probe  {}", probe(&p.padding_probe))?;
    for s in &p.steps {
        writeln!(
            out,
            "  step {}         {} micro-batches, {} tokens: total weight {:.4} (expected {:.4})",
            s.index, s.micro_batches, s.trained, s.total_weight, s.expected_weight
        )?;
    }
    writeln!(out)
}
