//! Findings: what a check concluded, each under a stable code, and the registry of codes.
//!
//! Codes are part of the JSON contract and of the CLI (`--deny`, `--warn`, `--allow`,
//! `maskaudit explain CODE`). Checks push findings with their default severity; the user's
//! overrides are applied once, at the end, so every output format sees the same verdict.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
    Info,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        })
    }
}

/// Which check emits a code, and so when a run lists the code among the checks it made
/// (JUnit's test cases: `Report::checks` in the report module, above this one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The lint checks, on every `lint` run and on `check`'s rows.
    Lint,
    /// The label alignment, with labels not declared shifted.
    Unshifted,
    /// The label alignment, with `--shifted`.
    Shifted,
    /// The EOS checks, with `--eos-id`.
    Eos,
    /// With both `--pad-id` and `--eos-id`.
    PadAndEos,
    /// `check`'s losses over every batch.
    Losses,
    /// The trace-consistency probe, when it compared logits.
    ModelProbe,
    /// The exporter's record, when the model has one.
    ExportRecord,
    /// The formulas of `--loss`/`--loss-method`.
    UserLoss,
    /// The padding probe of the user's loss, when it ran.
    PaddingProbe,
    /// The masked-logits probe of the user's loss, when it ran.
    MaskedLogitsProbe,
    /// The user's loss's gradient weight map, when its weights were recovered.
    Gradient,
    /// The optimizer-step simulation (`--accum`, `--world-size`).
    Steps,
    /// Listed only when found: the other outcome of a check (`no-padding`), or one of a mode's
    /// own (packed rows, a captured run).
    WhenFound,
}

/// The registry of finding codes: each code's variant, kebab-case name, default severity
/// (with, for the README, what else it may be), the check that emits it, and its one-sentence
/// description; its long form is `explain/<name>.md`. `explain`, JUnit's list of checks and
/// the README's findings table (held to this by tests/docs.rs) are derived from it.
macro_rules! codes {
    ($($variant:ident => $name:literal, $severity:ident $($note:literal)?, $check:ident,
        $description:literal;)*) => {
        /// Every finding code maskaudit can emit.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum Code { $($variant,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$variant,)*];

            /// The kebab-case name used in JSON and on the command line.
            pub fn name(self) -> &'static str {
                match self { $(Code::$variant => $name,)* }
            }

            /// One sentence: what the finding means.
            pub fn description(self) -> &'static str {
                match self { $(Code::$variant => $description,)* }
            }

            /// The severity the finding usually has, before `--deny`, `--warn`, `--allow`.
            pub fn default_severity(self) -> Severity {
                match self { $(Code::$variant => Severity::$severity,)* }
            }

            /// When the severity is not always the default: in which case it is what.
            pub fn severity_note(self) -> Option<&'static str> {
                match self { $(Code::$variant => None $(.or(Some($note)))?,)* }
            }

            /// The check that emits the code.
            pub fn check(self) -> Check {
                match self { $(Code::$variant => Check::$check,)* }
            }

            /// The long form `maskaudit explain CODE` prints: the cause, how to see it, a fix.
            pub fn explanation(self) -> &'static str {
                match self { $(Code::$variant => include_str!(concat!("explain/", $name, ".md")),)* }
            }
        }
    };
}

codes! {
    PaddingContamination => "padding-contamination", Info "(nobody computed it); error above `--max-contamination`, or with a loss that takes padding in when no user-loss finding says so", Losses,
        "A loss that leaves the padding targets unmasked would differ from the masked token mean by this much: what padding does to a loss that does not mask it.";
    NoPadding => "no-padding", Info, WhenFound,
        "No next-token target is padding, so padding cannot contaminate this dataset's loss.";
    NoTrainedPositions => "no-trained-positions", Error, Losses,
        "The mask trains no target at all: no loss can be computed.";
    MixedMaskSource => "mixed-mask-source", Warning, Lint,
        "Rows take their mask from different fields (loss_mask, labels, attention_mask), which usually means rows were built by different code.";
    LossIncludesPadding => "loss-includes-padding", Error, UserLoss,
        "Your loss is the mean over all positions, padding included.";
    PaddingInDenominator => "padding-in-denominator", Error, UserLoss,
        "Your loss divides the masked sum by every position, padding included, instead of by the number of trained tokens.";
    SequenceWeightedMean => "sequence-weighted-mean", Warning, UserLoss,
        "Your loss averages per-row means, so a short row weighs as much as a long one.";
    OffByOneShift => "off-by-one-shift", Error, UserLoss,
        "Your loss scores the logits against the wrong token: the targets are shifted twice, or not at all.";
    UnnormalizedSum => "unnormalized-sum", Warning, UserLoss,
        "Your loss is the masked sum, so its scale follows the number of trained tokens in each batch.";
    LossMismatch => "loss-mismatch", Error, UserLoss,
        "Your loss matches none of the formulas maskaudit knows on these batches.";
    LossAmbiguous => "loss-ambiguous", Warning, UserLoss,
        "On this data your loss matches several formulas that cannot be told apart.";
    PaddingVariance => "padding-variance", Error, PaddingProbe,
        "Appending padding columns to a batch changes your loss: padding enters it.";
    MaskedLogitsLeak => "masked-logits-leak", Error, MaskedLogitsProbe,
        "Changing the logits at untrained positions changes your loss: positions the mask excludes still reach it.";
    EmptySupervision => "empty-supervision", Warning, Lint,
        "Rows with no trained target after the shift contribute nothing to the loss, typically an SFT answer truncated away.";
    EosMasked => "eos-masked", Error, Eos,
        "Every occurrence of EOS is untrained, so the model never learns to stop; the usual cause is pad == eos with a collator that set every pad id to -100.";
    EosMissing => "eos-missing", Warning, Eos,
        "The EOS id never appears as a target, so the model never learns to stop.";
    PadIsEos => "pad-is-eos", Info, PadAndEos,
        "The pad id is the EOS id, so any rule that masks padding by id also masks EOS.";
    LabelsPreShifted => "labels-pre-shifted", Error, Unshifted,
        "The labels are already shifted (labels[t] == input_ids[t+1]), so a loss that shifts again trains the token after next.";
    LabelsNotShifted => "labels-not-shifted", Error, Shifted,
        "The data was declared pre-shifted (--shifted) but its labels are aligned with input_ids, so a loss that does not shift trains each token to predict itself.";
    PackedBoundarySupervised => "packed-boundary-supervised", Error, Lint,
        "In packed rows, the first token of a document is a trained target, predicted from the end of the previous document.";
    LoggedLossMismatch => "logged-loss-mismatch", Warning, WhenFound,
        "A captured step's logged loss is not the step's token mean: the number watched during training is not the loss of the step.";
    TrainerCountMismatch => "trainer-count-mismatch", Error, WhenFound,
        "A captured step's num_items_in_batch is not the number of trained targets in its micro-batches, so the trainer divides the loss by the wrong count.";
    CapturedLossesMismatch => "captured-losses-mismatch", Error, WhenFound,
        "The model's per-token losses on a captured run's batches differ from the losses the run recorded: the model checked is not the one that was trained, or its trace is not faithful.";
    PackedRowsSplit => "packed-rows-split", Info, WhenFound,
        "Packed rows were split into their documents, each run as its own row, because the model cannot keep documents apart: the losses are the per-document truth.";
    ModelCrossesDocuments => "model-crosses-documents", Error, WhenFound,
        "A packed row's per-token losses differ from those of its documents run alone: the model lets a document attend to the ones before it.";
    MaskLabelDisagree => "mask-label-disagree", Warning, Lint,
        "loss_mask, labels and attention_mask disagree about which tokens are trained, so the loss depends on which field the training code reads.";
    PaddingTrained => "padding-trained", Error, Lint,
        "Padding positions are trained targets, so the loss includes padding.";
    UnexpectedNegativeLabel => "unexpected-negative-label", Error, Lint,
        "Labels are negative but not the ignore index -100, which a loss ignoring -100 rejects or treats as a class.";
    NonFiniteLoss => "non-finite-loss", Error, Losses,
        "A per-token loss is NaN or infinite, so every aggregate that includes it is meaningless.";
    ModelNotPadInvariant => "model-not-pad-invariant", Error, ModelProbe,
        "The model's logits at real tokens change with the padding around them or with the batch's shape, so its losses cannot be trusted.";
    ModelLengthUnverified => "model-length-unverified", Warning, ExportRecord,
        "Batches are longer than any length at which the exporter compared the trace with the eager model.";
    GradientTrainsUntrained => "gradient-trains-untrained", Error, Gradient,
        "Your loss's gradient reaches targets the mask excludes: padding or prompt tokens are trained.";
    AccumulationMisweighted => "accumulation-misweighted", Error "with a loss that gives weights, else info", Steps,
        "Across the micro-batches and ranks of an optimizer step, tokens get unequal weights or the step's weights do not sum to one.";
    GradientNotCrossEntropy => "gradient-not-cross-entropy", Warning, Gradient,
        "Part of your loss's gradient is not next-token cross-entropy: label smoothing, an auxiliary term, other targets, or a leak through the logits.";
    PolicyTrainsMasked => "policy-trains-masked", Error, WhenFound,
        "Your policy loss gives weight to log-probs the response mask excludes: prompt, tool-output or padding tokens.";
    PolicyNanThroughMask => "policy-nan-through-mask", Error "(warning when only the probe's NaN reaches it)", WhenFound,
        "A NaN at a masked position (log-prob, old or reference log-prob, advantage) reaches your policy loss: NaN × 0 is NaN.";
    PolicyAggregationUnrecognised => "policy-aggregation-unrecognised", Warning "(error when the weights grow with length squared)", WhenFound,
        "Your policy loss weighs tokens by none of token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm; per-token weights growing with length are a broadcast (B,1) term.";
    PolicyAggregationMismatch => "policy-aggregation-mismatch", Error, WhenFound,
        "Your policy loss computes another aggregation than --expect-aggregation names.";
    PolicyPaddingInStatistic => "policy-padding-in-statistic", Warning "(error for a preference loss)", WhenFound,
        "Appending padding columns changes your policy or preference loss's weights: padding enters its normaliser or its per-sequence statistic.";
    PolicyStepMisnormalised => "policy-step-misnormalised", Error, WhenFound,
        "Under --accum/--world-size an optimizer step weighs its tokens differently from one batch: an extra division by the accumulation steps, or a count ignored.";
}

/// The README's findings table, from the registry: code, default severity, meaning
/// (tests/docs.rs holds the README to it).
pub fn markdown_table() -> String {
    let mut out = String::from("| code | default severity | meaning |\n|---|---|---|\n");
    for &code in Code::ALL {
        let severity = match code.severity_note() {
            Some(note) => format!("{} {note}", code.default_severity()),
            None => code.default_severity().to_string(),
        };
        out.push_str(&format!(
            "| `{}` | {severity} | {} |\n",
            code.name(),
            code.description()
        ));
    }
    out
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Code {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::by_name(Code::ALL, Code::name, s)
            .map_err(|known| format!("unknown finding code '{s}' (known: {known})"))
    }
}

impl Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub code: Code,
    pub severity: Severity,
    pub message: String,
    /// Where the finding was first seen: record numbers (JSONL lines, or 1-based Parquet
    /// rows), at most [`Finding::MAX_RECORDS`]; absent from the JSON when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<usize>,
    /// Accepted by `--baseline`: downgraded to information, never failing; present in the
    /// JSON (as `true`) only then.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub baselined: bool,
}

impl Finding {
    /// How many record numbers a finding keeps.
    pub const MAX_RECORDS: usize = 5;

    pub fn new(code: Code, severity: Severity, message: impl Into<String>) -> Self {
        Self {
            code,
            severity,
            message: message.into(),
            records: vec![],
            baselined: false,
        }
    }

    pub fn with_records(mut self, records: Vec<usize>) -> Self {
        self.records = records;
        self
    }
}

/// The user's severity overrides (`--deny`, `--warn`, `--allow`).
#[derive(Debug, Clone, Default)]
pub struct SeverityOverrides {
    map: BTreeMap<Code, Severity>,
}

impl SeverityOverrides {
    /// Later lists win over earlier ones: allow, then warn, then deny.
    pub fn new(deny: &[Code], warn: &[Code], allow: &[Code]) -> Self {
        let mut map = BTreeMap::new();
        for (codes, severity) in [
            (allow, Severity::Info),
            (warn, Severity::Warning),
            (deny, Severity::Error),
        ] {
            for &code in codes {
                map.insert(code, severity);
            }
        }
        Self { map }
    }

    pub fn apply(&self, findings: &mut [Finding]) {
        for f in findings {
            if let Some(&severity) = self.map.get(&f.code) {
                f.severity = severity;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn codes_are_unique_kebab_case_and_round_trip() {
        let names: HashSet<&str> = Code::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(names.len(), Code::ALL.len());
        for &code in Code::ALL {
            assert!(code
                .name()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '-'));
            assert_eq!(code.name().parse::<Code>(), Ok(code));
            assert!(code.description().ends_with('.'));
        }
        assert!("nope"
            .parse::<Code>()
            .unwrap_err()
            .contains("padding-contamination"));
    }

    #[test]
    fn overrides_change_severity_deny_last() {
        let mut findings = vec![
            Finding::new(Code::NoPadding, Severity::Info, "a"),
            Finding::new(Code::MixedMaskSource, Severity::Warning, "b"),
        ];
        SeverityOverrides::new(
            &[Code::NoPadding],
            &[Code::NoPadding],
            &[Code::MixedMaskSource],
        )
        .apply(&mut findings);
        assert_eq!(findings[0].severity, Severity::Error);
        assert_eq!(findings[1].severity, Severity::Info);
    }
}
