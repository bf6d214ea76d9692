//! The findings `check` draws from its totals and its step simulation.

use crate::data::batch::TargetCounts;
use crate::findings::{Code, Finding, Severity};
use maskaudit_core::loss::aggregate::{Contamination, LossTotals};
use maskaudit_core::loss::steps::{self, FormulaSummary, StepFormula, StepReport};
use maskaudit_core::loss::user::UserLossReport;

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

/// Share of a user loss's gradient on padding above which the loss takes padding in (a loss
/// that masks padding leaves exactly zero there).
const PADDING_SHARE: f64 = 1e-6;

/// The user-loss findings that already say, as errors, that the loss takes padding in.
const PADDING_IN_LOSS: [Code; 4] = [
    Code::LossIncludesPadding,
    Code::PaddingInDenominator,
    Code::PaddingVariance,
    Code::GradientTrainsUntrained,
];

/// Whether the user's loss takes padding in: it matched a formula over all positions, the
/// padding probe moved it, or part of its gradient reaches padding.
pub(super) fn loss_takes_padding(user: &UserLossReport) -> bool {
    matches!(
        user.matched,
        Some("all_positions_mean" | "masked_sum_over_all_positions")
    ) || user.probes.padding.passed == Some(false)
        || user.gradient.max_padding_share > PADDING_SHARE
}

/// What the contamination finding is judged on.
pub(super) struct ContaminationEvidence<'a> {
    pub(super) contamination: Option<Contamination>,
    pub(super) targets: TargetCounts,
    /// `--max-contamination`.
    pub(super) max: Option<f64>,
    /// `--pad-id`: without it, rows without an attention mask have no padding of their own.
    pub(super) pad_id: Option<i64>,
    /// The user's loss, when one was audited, and its findings.
    pub(super) user_loss: Option<(&'a UserLossReport, &'a [Finding])>,
    /// Whether every padding target is one that splitting packed rows appended (the rows as
    /// read have none): a padding-free trainer has no such padding, so neither has the run.
    pub(super) only_split_padding: bool,
}

/// `padding-contamination`: what a loss that leaves the padding targets unmasked reads against
/// the masked token mean, over padding targets only (prompts stay masked), so it never fires
/// on rows without padding (`no-padding` says so instead). Without a loss it is what such a
/// loss *would* read, which nobody computed: information. With `--max-contamination`, an error
/// above it. With a loss that takes padding in, an error, unless a user-loss finding already
/// says so as one.
pub(super) fn contamination_finding(e: &ContaminationEvidence) -> Option<Finding> {
    let c = e.contamination;
    let t = e.targets;
    if t.padding == 0 || e.only_split_padding {
        let hint = if e.pad_id.is_none() {
            " (without --pad-id, pad ids in rows without an attention mask are not padding)"
        } else {
            ""
        };
        return (t.trained > 0).then(|| {
            Finding::new(
                Code::NoPadding,
                Severity::Info,
                format!(
                    "none of the {} next-token targets is padding: a loss that does not mask padding reads the masked token mean here{hint}",
                    t.positions
                ),
            )
        });
    }
    let c = c?;
    let size = c.relative.abs();
    let share = t.padding as f64 / t.positions.max(1) as f64 * 100.0;
    let mut message = if t.padding_trained == t.padding {
        format!(
            "every one of the {} padding targets ({share:.1}% of positions) is trained by the mask itself, so the masked token mean includes padding (see padding-trained)",
            t.padding
        )
    } else {
        let direction = if c.absolute < 0.0 { "lower" } else { "higher" };
        format!(
            "a loss that leaves the {} padding targets ({share:.1}% of positions) unmasked reads {:+.4} ({:+.2}%) vs the masked token mean: {direction} than the truth",
            t.padding,
            c.absolute,
            c.relative * 100.0,
        )
    };
    let takes_padding = e.user_loss.filter(|(u, _)| loss_takes_padding(u));
    let said = takes_padding.and_then(|(_, findings)| {
        findings
            .iter()
            .find(|f| f.severity == Severity::Error && PADDING_IN_LOSS.contains(&f.code))
    });
    let severity = match (e.max, takes_padding, said) {
        (Some(max), _, _) if size > max => {
            message.push_str(&format!("; above --max-contamination {max}"));
            Severity::Error
        }
        (Some(_), _, _) => Severity::Info,
        (None, Some(_), Some(f)) => {
            message.push_str(&format!("; your loss takes padding in (see {})", f.code));
            Severity::Info
        }
        (None, Some(_), None) => {
            message.push_str("; your loss takes padding in");
            Severity::Error
        }
        (None, None, _) => {
            if e.user_loss.is_none() {
                message.push_str(" (no --loss: what a loss that does not mask padding would read)");
            }
            Severity::Info
        }
    };
    Some(Finding::new(Code::PaddingContamination, severity, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(padding: u64, padding_trained: u64) -> TargetCounts {
        TargetCounts {
            positions: 10,
            trained: 5,
            padding,
            padding_trained,
            untrained_real: 5u64.saturating_sub(padding.saturating_sub(padding_trained)),
        }
    }

    #[test]
    fn contamination_severity_follows_the_threshold() {
        let c = Some(Contamination {
            absolute: -0.5,
            relative: -0.2,
        });
        let sev = |max| {
            contamination_finding(&ContaminationEvidence {
                contamination: c,
                targets: counts(3, 0),
                max,
                pad_id: Some(0),
                user_loss: None,
                only_split_padding: false,
            })
            .unwrap()
            .severity
        };
        // Without a loss nobody computed it: information, whatever its size.
        assert_eq!(sev(None), Severity::Info);
        assert_eq!(sev(Some(0.1)), Severity::Error);
        assert_eq!(sev(Some(0.25)), Severity::Info);
        // No padding target: no contamination, whatever the untrained prompts.
        let f = contamination_finding(&ContaminationEvidence {
            contamination: None,
            targets: counts(0, 0),
            max: Some(0.1),
            pad_id: Some(0),
            user_loss: None,
            only_split_padding: false,
        })
        .unwrap();
        assert_eq!((f.code, f.severity), (Code::NoPadding, Severity::Info));
        assert!(contamination_finding(&ContaminationEvidence {
            contamination: None,
            targets: counts(3, 0),
            max: None,
            pad_id: Some(0),
            user_loss: None,
            only_split_padding: false,
        })
        .is_none());
        // Padding that only splitting packed rows appended is no padding of the run's.
        let f = contamination_finding(&ContaminationEvidence {
            contamination: c,
            targets: counts(3, 0),
            max: Some(0.1),
            pad_id: Some(0),
            user_loss: None,
            only_split_padding: true,
        })
        .unwrap();
        assert_eq!((f.code, f.severity), (Code::NoPadding, Severity::Info));
    }

    #[test]
    fn padding_the_mask_trains_is_said_as_such() {
        let f = contamination_finding(&ContaminationEvidence {
            contamination: Some(Contamination {
                absolute: 0.0,
                relative: 0.0,
            }),
            targets: counts(3, 3),
            max: None,
            pad_id: Some(0),
            user_loss: None,
            only_split_padding: false,
        })
        .unwrap();
        assert!(
            f.message.contains("trained by the mask itself"),
            "{}",
            f.message
        );
        assert_eq!(f.severity, Severity::Info);
    }
}
