//! `maskaudit explain CODE`: the long form of each finding code.

use crate::findings::Code;

pub fn explain(code: &str) -> anyhow::Result<String> {
    if code == "all" {
        let mut out = String::new();
        for c in Code::ALL {
            out.push_str(&format!("{:<28} {}\n", c.name(), c.description()));
        }
        return Ok(out);
    }
    let code: Code = code.parse().map_err(anyhow::Error::msg)?;
    Ok(format!(
        "{}: {}\n\n{}\n",
        code.name(),
        code.description(),
        long_form(code)
    ))
}

fn long_form(code: Code) -> &'static str {
    match code {
        Code::PaddingContamination => include_str!("explain/padding-contamination.md"),
        Code::NoPadding => include_str!("explain/no-padding.md"),
        Code::NoTrainedPositions => include_str!("explain/no-trained-positions.md"),
        Code::MixedMaskSource => include_str!("explain/mixed-mask-source.md"),
        Code::LossIncludesPadding => include_str!("explain/loss-includes-padding.md"),
        Code::PaddingInDenominator => include_str!("explain/padding-in-denominator.md"),
        Code::SequenceWeightedMean => include_str!("explain/sequence-weighted-mean.md"),
        Code::OffByOneShift => include_str!("explain/off-by-one-shift.md"),
        Code::UnnormalizedSum => include_str!("explain/unnormalized-sum.md"),
        Code::LossMismatch => include_str!("explain/loss-mismatch.md"),
        Code::LossAmbiguous => include_str!("explain/loss-ambiguous.md"),
        Code::PaddingVariance => include_str!("explain/padding-variance.md"),
        Code::MaskedLogitsLeak => include_str!("explain/masked-logits-leak.md"),
        Code::EmptySupervision => include_str!("explain/empty-supervision.md"),
        Code::EosMasked => include_str!("explain/eos-masked.md"),
        Code::EosMissing => include_str!("explain/eos-missing.md"),
        Code::PadIsEos => include_str!("explain/pad-is-eos.md"),
        Code::LabelsPreShifted => include_str!("explain/labels-pre-shifted.md"),
        Code::LabelsNotShifted => include_str!("explain/labels-not-shifted.md"),
        Code::PackedBoundarySupervised => include_str!("explain/packed-boundary-supervised.md"),
        Code::LoggedLossMismatch => include_str!("explain/logged-loss-mismatch.md"),
        Code::TrainerCountMismatch => include_str!("explain/trainer-count-mismatch.md"),
        Code::CapturedLossesMismatch => include_str!("explain/captured-losses-mismatch.md"),
        Code::PackedRowsSplit => include_str!("explain/packed-rows-split.md"),
        Code::ModelCrossesDocuments => include_str!("explain/model-crosses-documents.md"),
        Code::MaskLabelDisagree => include_str!("explain/mask-label-disagree.md"),
        Code::PaddingTrained => include_str!("explain/padding-trained.md"),
        Code::UnexpectedNegativeLabel => include_str!("explain/unexpected-negative-label.md"),
        Code::NonFiniteLoss => include_str!("explain/non-finite-loss.md"),
        Code::ModelNotPadInvariant => include_str!("explain/model-not-pad-invariant.md"),
        Code::ModelLengthUnverified => include_str!("explain/model-length-unverified.md"),
        Code::GradientTrainsUntrained => include_str!("explain/gradient-trains-untrained.md"),
        Code::AccumulationMisweighted => include_str!("explain/accumulation-misweighted.md"),
        Code::GradientNotCrossEntropy => include_str!("explain/gradient-not-cross-entropy.md"),
        Code::PolicyTrainsMasked => include_str!("explain/policy-trains-masked.md"),
        Code::PolicyNanThroughMask => include_str!("explain/policy-nan-through-mask.md"),
        Code::PolicyAggregationUnrecognised => {
            include_str!("explain/policy-aggregation-unrecognised.md")
        }
        Code::PolicyAggregationMismatch => include_str!("explain/policy-aggregation-mismatch.md"),
        Code::PolicyPaddingInStatistic => include_str!("explain/policy-padding-in-statistic.md"),
        Code::PolicyStepMisnormalised => include_str!("explain/policy-step-misnormalised.md"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_long_form_named_after_it() {
        for &code in Code::ALL {
            let text = explain(code.name()).unwrap();
            assert!(text.starts_with(code.name()), "{text}");
            assert!(
                text.len() > code.description().len() + 100,
                "{code}: long form missing"
            );
        }
        assert!(explain("nope").is_err());
    }
}
