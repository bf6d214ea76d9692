//! The findings `check` draws from its totals and its step simulation.

use super::NOTABLE_CONTAMINATION;
use crate::findings::{Code, Finding, Severity};
use crate::loss::aggregate::{Contamination, LossTotals};
use crate::loss::steps::{self, FormulaSummary, StepFormula, StepReport};

/// `accumulation-misweighted`: an error when the user's loss, run per micro-batch as a trainer
/// runs it, misweights a step; information on what the common formulas would do otherwise.
pub(super) fn step_findings(steps: &StepReport, has_loss: bool) -> Vec<Finding> {
    let describe = |f: &FormulaSummary| {
        let sums = if (f.min_total_weight - 1.0).abs() > steps::MISWEIGHT_TOLERANCE
            || (f.max_total_weight - 1.0).abs() > steps::MISWEIGHT_TOLERANCE
        {
            format!(
                ", and a step's weights sum to {:.3}..{:.3} instead of 1",
                f.min_total_weight, f.max_total_weight
            )
        } else {
            String::new()
        };
        format!(
            "in step {} one token weighs {:.2}× the global token mean's 1/N (total variation {:.3} from uniform){sums}",
            f.worst_step, f.worst_max_relative_weight, f.worst_total_variation
        )
    };
    let config = format!("--accum {} --world-size {}", steps.accum, steps.world_size);
    if let Some(yours) = steps.formula(StepFormula::YourLoss) {
        if yours.misweights() {
            return vec![Finding::new(
                Code::AccumulationMisweighted,
                Severity::Error,
                format!(
                    "with {config}, your loss per micro-batch {}; see `maskaudit explain accumulation-misweighted`",
                    describe(yours)
                ),
            )];
        }
        return vec![];
    }
    let misweighting: Vec<String> = steps
        .formulas
        .iter()
        .filter(|f| f.misweights())
        .map(|f| format!("{}: {}", f.formula.name(), describe(f)))
        .collect();
    if misweighting.is_empty() {
        return vec![];
    }
    let why = if has_loss {
        "your loss takes no logits, so its per-token weights are unknown"
    } else {
        "no --loss says which formula your trainer uses"
    };
    vec![Finding::new(
        Code::AccumulationMisweighted,
        Severity::Info,
        format!(
            "with {config} ({why}), a trainer using {}",
            misweighting.join("; ")
        ),
    )]
}

/// Findings about the data that need the batches; the rest come from [`crate::lint`].
pub(super) fn data_findings(totals: &LossTotals) -> Vec<Finding> {
    let mut findings = vec![];
    if totals.trained == 0 {
        findings.push(Finding::new(
            Code::NoTrainedPositions,
            Severity::Error,
            format!(
                "none of the {} next-token positions has a trained target: check the mask field",
                totals.positions
            ),
        ));
    }
    findings
}

/// The contamination finding: an error above `max` (relative, either direction), a warning
/// above 1% when no maximum is given, otherwise information.
pub fn contamination_finding(
    contamination: Option<Contamination>,
    padding_fraction: Option<f64>,
    max: Option<f64>,
) -> Option<Finding> {
    let c = contamination?;
    if padding_fraction == Some(0.0) {
        return Some(Finding::new(
            Code::NoPadding,
            Severity::Info,
            "every next-token position is trained: a loss over all positions equals the masked mean",
        ));
    }
    let size = c.relative.abs();
    let direction = if c.absolute < 0.0 { "lower" } else { "higher" };
    let message = format!(
        "a loss that includes the {:.1}% untrained positions reads {:+.4} ({:+.2}%) vs the masked token mean: {} than the truth",
        padding_fraction.unwrap_or(0.0) * 100.0,
        c.absolute,
        c.relative * 100.0,
        direction
    );
    let severity = match max {
        Some(max) if size > max => Severity::Error,
        Some(_) => Severity::Info,
        None if size > NOTABLE_CONTAMINATION => Severity::Warning,
        None => Severity::Info,
    };
    let message = match max {
        Some(max) if size > max => format!("{message}; above --max-contamination {max}"),
        _ => message,
    };
    Some(Finding::new(Code::PaddingContamination, severity, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contamination_severity_follows_the_threshold() {
        let c = Some(Contamination {
            absolute: -0.5,
            relative: -0.2,
        });
        let sev = |max| contamination_finding(c, Some(0.3), max).unwrap().severity;
        assert_eq!(sev(None), Severity::Warning);
        assert_eq!(sev(Some(0.1)), Severity::Error);
        assert_eq!(sev(Some(0.25)), Severity::Info);
        let f = contamination_finding(c, Some(0.0), Some(0.1)).unwrap();
        assert_eq!((f.code, f.severity), (Code::NoPadding, Severity::Info));
        assert!(contamination_finding(None, Some(0.3), None).is_none());
    }
}
