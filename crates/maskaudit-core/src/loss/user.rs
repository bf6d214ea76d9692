//! What the report says of the user's loss, the loss's arguments by name, and the findings
//! drawn from its gradient weight map. Running the loss needs libtorch:
//! `maskaudit_torch::loss::user`.

use std::fmt;

use serde::Serialize;

use crate::findings::{Code, Finding, Severity};
use crate::loss::diagnosis::{HypothesisSummary, ProbeResult};
use crate::loss::weights::{BatchGradient, GradientSummary};

/// A tensor the user's loss can ask for by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossArg {
    Logits,
    InputIds,
    Labels,
    AttentionMask,
    ShiftLogits,
    Targets,
    LossMask,
    /// The trained targets of the whole optimizer step (all micro-batches and ranks), as a
    /// 0-dim int64 tensor: what Hugging Face passes as `num_items_in_batch`.
    NumItemsInBatch,
    /// Policy and preference losses (`loss::policy`): per-token log-probs of the next token
    /// `[B, T-1]`, computed by maskaudit with autograd, and the rollout's fields beside them.
    Logprobs,
    OldLogprobs,
    RefLogprobs,
    Advantages,
    ResponseMask,
    ChosenLogprobs,
    RejectedLogprobs,
    ChosenMask,
    RejectedMask,
    RefChosenLogprobs,
    RefRejectedLogprobs,
}

impl LossArg {
    const ALL: [LossArg; 19] = [
        LossArg::Logits,
        LossArg::InputIds,
        LossArg::Labels,
        LossArg::AttentionMask,
        LossArg::ShiftLogits,
        LossArg::Targets,
        LossArg::LossMask,
        LossArg::NumItemsInBatch,
        LossArg::Logprobs,
        LossArg::OldLogprobs,
        LossArg::RefLogprobs,
        LossArg::Advantages,
        LossArg::ResponseMask,
        LossArg::ChosenLogprobs,
        LossArg::RejectedLogprobs,
        LossArg::ChosenMask,
        LossArg::RejectedMask,
        LossArg::RefChosenLogprobs,
        LossArg::RefRejectedLogprobs,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LossArg::Logits => "logits",
            LossArg::InputIds => "input_ids",
            LossArg::Labels => "labels",
            LossArg::AttentionMask => "attention_mask",
            LossArg::ShiftLogits => "shift_logits",
            LossArg::Targets => "targets",
            LossArg::LossMask => "loss_mask",
            LossArg::NumItemsInBatch => "num_items_in_batch",
            LossArg::Logprobs => "logprobs",
            LossArg::OldLogprobs => "old_logprobs",
            LossArg::RefLogprobs => "ref_logprobs",
            LossArg::Advantages => "advantages",
            LossArg::ResponseMask => "response_mask",
            LossArg::ChosenLogprobs => "chosen_logprobs",
            LossArg::RejectedLogprobs => "rejected_logprobs",
            LossArg::ChosenMask => "chosen_mask",
            LossArg::RejectedMask => "rejected_mask",
            LossArg::RefChosenLogprobs => "ref_chosen_logprobs",
            LossArg::RefRejectedLogprobs => "ref_rejected_logprobs",
        }
    }

    /// An argument of a policy or preference loss: `check` audits such a loss on rollouts
    /// (`commands::check::policy`), never on the cross-entropy path.
    pub fn is_policy(self) -> bool {
        !matches!(
            self,
            LossArg::Logits
                | LossArg::InputIds
                | LossArg::Labels
                | LossArg::AttentionMask
                | LossArg::ShiftLogits
                | LossArg::Targets
                | LossArg::LossMask
                | LossArg::NumItemsInBatch
        )
    }

    pub fn from_logits(self) -> bool {
        matches!(self, LossArg::Logits | LossArg::ShiftLogits)
    }
}

impl fmt::Display for LossArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for LossArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::by_name(&LossArg::ALL, LossArg::name, s.trim())
            .map_err(|known| format!("unknown loss argument '{s}' (known: {known})"))
    }
}

/// What the JSON reports under `user_loss`.
#[derive(Debug, Clone, Serialize)]
pub struct UserLossReport {
    /// The loss file, or `MODEL::method`.
    pub source: String,
    pub args: Vec<&'static str>,
    /// The user's loss, averaged over the compared batches.
    pub value: Option<f64>,
    /// The masked token mean averaged over the same batches.
    pub reference: Option<f64>,
    /// The formula the loss computes, when one alone matches.
    pub matched: Option<&'static str>,
    /// Every formula that matched on every batch (several when indistinguishable).
    pub candidates: Vec<&'static str>,
    /// Worst relative error against the matched (or closest) formula.
    pub max_relative_error: Option<f64>,
    /// `--rtol`: relative slack on top of the derived tolerance (0 by default).
    pub rtol: f64,
    /// The largest tolerance the masked token mean was held to, relative to its value: the
    /// float32 rounding bound of the batch plus `rtol` (docs/guide.md).
    pub max_relative_tolerance: Option<f64>,
    pub batches: u64,
    pub verdict: String,
    pub hypotheses: Vec<HypothesisSummary>,
    pub probes: Probes,
    /// The gradient weight map (added within schema version 1).
    pub gradient: GradientSummary,
    /// A policy loss's aggregation (`token_mean`, `seq_mean_token_mean`, `seq_mean_token_sum`,
    /// `seq_mean_token_sum_norm`); null for other losses, or when none fits (added within
    /// schema version 2).
    pub aggregation: Option<&'static str>,
    /// The policy or preference audit; absent for a cross-entropy loss.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::loss::policy_aggregation::PolicyReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probes {
    pub padding: ProbeResult,
    pub masked_logits: ProbeResult,
}

impl UserLossReport {
    /// How close a formula had to come: "tolerance float32 rounding, up to 3.1e-6 relative".
    pub fn tolerance_phrase(&self) -> String {
        let upto = match self.max_relative_tolerance {
            Some(t) => format!(", up to {t:.1e} relative"),
            None => String::new(),
        };
        let rtol = if self.rtol > 0.0 {
            format!(" (with --rtol {:e})", self.rtol)
        } else {
            String::new()
        };
        format!("tolerance float32 rounding{rtol}{upto}")
    }
}

/// Share of the gradient on untrained targets above which the loss trains them: a masked
/// loss leaves exactly zero there.
const UNTRAINED_SHARE: f64 = 1e-6;

pub fn gradient_findings(g: &GradientSummary) -> Vec<Finding> {
    let mut findings = vec![];
    let worst = |f: fn(&BatchGradient) -> f64| {
        g.batches
            .iter()
            .max_by(|a, b| f(a).total_cmp(&f(b)))
            .map(|b| b.line)
            .unwrap_or(0)
    };
    if g.max_untrained_share > UNTRAINED_SHARE {
        findings.push(
            Finding::new(
                Code::GradientTrainsUntrained,
                Severity::Error,
                format!(
                    "{:.1}% of your loss's gradient trains targets the mask excludes ({:.1}% padding), in the worst batch",
                    g.max_untrained_share * 100.0,
                    g.max_padding_share * 100.0
                ),
            )
            .with_records(vec![worst(|b| b.untrained_share)]),
        );
    }
    let leak = g
        .batches
        .iter()
        .map(|b| b.last_position_share)
        .fold(0.0, f64::max);
    if g.max_residual_excess > 1.0 || leak > UNTRAINED_SHARE {
        findings.push(
            Finding::new(
                Code::GradientNotCrossEntropy,
                Severity::Warning,
                format!(
                    "part of your loss's gradient is not next-token cross-entropy (residual up to {:.1}× what float32 rounding leaves; {:.2e} of the gradient at last positions, which predict nothing): label smoothing, a z-loss, other targets, or the logits entering the loss some other way",
                    g.max_residual_excess, leak
                ),
            )
            .with_records(vec![worst(|b| b.max_residual_excess)]),
        );
    }
    findings
}

/// What the padding probe did, once it ran on at least one batch; `failure` is the note left by
/// a batch whose padded call failed (empty if none did), which must not be lost.
pub fn padding_note(failure: &str) -> String {
    let did = "appended padding columns (pad id, mask 0, random logits)";
    if failure.is_empty() {
        did.into()
    } else {
        format!("{did}; {failure}")
    }
}
