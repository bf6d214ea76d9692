//! The report: everything a run concluded, independent of how it is rendered.
//!
//! `output::table` and `output::json` render the same value, so the exit status and the
//! verdict never depend on the format.

use serde::Serialize;

use crate::aggregate::{Aggregates, Contamination};
use crate::data::{Format, Unit};
use crate::findings::{Finding, Severity};
use crate::lint::LintStats;
use crate::model::consistency::Consistency;
use crate::model::{ArgsSource, ForwardArg, OutputForm};
use crate::steps::StepReport;
use crate::userloss::UserLossReport;

/// Bumped when a key changes meaning or disappears; new keys may appear within a version.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

impl Verdict {
    pub fn of(findings: &[Finding]) -> Self {
        if findings.iter().any(|f| f.severity == Severity::Error) {
            Verdict::Fail
        } else {
            Verdict::Pass
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub vocab_size: i64,
    pub device: String,
    /// The forward's arguments joined by `_`: `input_ids`, `input_ids_attention_mask`,
    /// `input_ids_position_ids`, `input_ids_labels`, …
    pub signature: String,
    /// The forward's arguments in order (added within schema version 1, as are the keys below).
    pub forward_args: Vec<ForwardArg>,
    /// `record` (the maskaudit-export record), `option` (--forward-args), `loss_args`
    /// (--loss-method forward) or `probe`.
    pub forward_args_source: ArgsSource,
    /// How the arguments were concluded, in words.
    pub forward_args_note: String,
    /// `tensor`, `tuple_first`, `loss_then_logits` or `dict_logits`.
    pub output: OutputForm,
    /// The parameters' dtype: `float32`, `bfloat16`, `float16`, …
    pub dtype: String,
    /// The dtype the forward ran in: `dtype`, or what `--dtype` converted the model to.
    pub run_dtype: String,
    /// Whether float32 matrix products used TF32 (`--tf32`; only on CUDA, in float32).
    pub tf32: bool,
    /// From the exporter's record; null without one.
    pub architecture: Option<String>,
    pub max_position_embeddings: Option<i64>,
    /// The trace-consistency probe on the first batch.
    pub consistency: Consistency,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataSummary {
    pub path: String,
    pub rows: u64,
    pub batches: u64,
    pub batch_size: usize,
    pub pad_id: Option<i64>,
    /// Next-token positions of all batches, padding included (N).
    pub positions: u64,
    /// Positions whose target is trained (Σm).
    pub supervised_positions: u64,
    /// 1 − Σm / N: every untrained position, padding and prompts alike.
    pub padding_fraction: Option<f64>,
    /// Positions whose target is padding (attention 0).
    pub padding_positions: u64,
    /// Positions whose target is a real token left untrained (prompts, masked turns).
    pub untrained_token_positions: u64,
    /// `loss_mask`, `labels`, `attention_mask`, `all_tokens`, or `mixed`.
    pub mask_source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub model: ModelInfo,
    pub data: DataSummary,
    /// The lint statistics of the same rows (added within schema version 1).
    pub statistics: LintStats,
    pub losses: Aggregates,
    pub contamination: Option<Contamination>,
    /// The audit of the user's loss; null without `--loss`/`--loss-method`.
    pub user_loss: Option<UserLossReport>,
    /// The optimizer-step simulation; null without --accum/--world-size.
    pub steps: Option<StepReport>,
    pub findings: Vec<Finding>,
    pub verdict: Verdict,
}

/// What `lint` read, and how.
#[derive(Debug, Clone, Serialize)]
pub struct LintDataInfo {
    pub path: String,
    /// `jsonl`, `jsonl.gz` or `parquet`.
    pub format: Format,
    /// What record numbers count: `line` (JSONL) or `row` (Parquet, 1-based).
    pub records: Unit,
    pub pad_id: Option<i64>,
    pub eos_id: Option<i64>,
    /// `--shifted`: labels declared pre-shifted.
    pub shifted: bool,
    pub batch_size: Option<usize>,
}

/// The result of `maskaudit lint`.
#[derive(Debug, Clone, Serialize)]
pub struct LintReport {
    pub schema_version: u32,
    pub data: LintDataInfo,
    pub statistics: LintStats,
    pub findings: Vec<Finding>,
    pub verdict: Verdict,
}
