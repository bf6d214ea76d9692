//! The report: everything a run concluded, independent of how it is rendered.
//!
//! The renderers below (`table`, `json`, `markdown`, `html`, `junit`, `github`, `lint_table`)
//! render the same value, so the exit status and the verdict never depend on the format.

pub mod baseline;
pub mod github;
pub mod html;
pub mod json;
pub mod junit;
pub mod lint_table;
pub mod markdown;
pub mod policy_table;
pub mod ranks_table;
pub mod table;
pub mod token_rows;

use serde::Serialize;

use crate::data::{Format, Unit};
use crate::findings::{Check, Code, Finding, Severity};
use crate::lint::LintStats;
use crate::loss::aggregate::{Aggregates, Contamination};
use crate::loss::steps::StepReport;
use crate::loss::user::UserLossReport;
use crate::model::consistency::Consistency;
use crate::model::{ArgsSource, ForwardArg, OutputForm};
use crate::report::token_rows::TokenRow;

/// Bumped when a key changes meaning or disappears; new keys may appear within a version.
/// Version 2: one meaning of padding (`data.padding_fraction` is padding targets / positions,
/// `padding_target_positions`, `padding_trained_positions`, `untrained_real_target_positions`
/// replace `padding_positions` and `untrained_token_positions`; `contamination` is over padding
/// targets, against `losses.trained_and_padding_mean`).
pub const SCHEMA_VERSION: u32 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Pass,
    Fail,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
        }
    }

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
    /// Which cross-entropy the GPU ran: `fused-cuda` (maskaudit's kernel, `loss::cuda_ce`) or
    /// `libtorch`; the key is absent where no cross-entropy ran on a GPU (CPU runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_entropy: Option<String>,
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
    /// `padding_target_positions / positions`.
    pub padding_fraction: Option<f64>,
    /// Positions whose target is padding (`data::padding`: the row's attention-0 or pad-id
    /// runs, left padding included, and what batching appended), trained or not.
    pub padding_target_positions: u64,
    /// Of those, trained: the mask trains padding.
    pub padding_trained_positions: u64,
    /// Positions whose target is a real token left untrained (prompts, masked turns).
    pub untrained_real_target_positions: u64,
    /// `loss_mask`, `labels`, `attention_mask`, `all_tokens`, or `mixed`.
    pub mask_source: String,
    /// What record numbers count (not in the JSON, which predates it).
    #[serde(skip)]
    pub records: Unit,
    /// Packed rows and what became of them; absent when no row was packed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packing: Option<PackingSummary>,
    /// A captured training run (`maskaudit.capture`), batched as captured; absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capture: Option<crate::data::capture::CaptureSummary>,
}

/// Packed rows (several documents in a row) in a `check` run.
#[derive(Debug, Clone, Serialize)]
pub struct PackingSummary {
    /// Rows with several documents (or a `seq_lens`/`cu_seqlens` field).
    pub packed_rows: u64,
    /// Of those, split into their documents, each run as its own row (the model cannot keep
    /// documents apart), and the documents they gave.
    pub split_rows: u64,
    pub split_documents: u64,
    /// The packing probe (packed rows run as they are): the largest relative difference of a
    /// per-token loss from its document run alone, and the tolerance.
    pub probe_difference: Option<f64>,
    pub probe_tolerance: Option<f64>,
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
    /// The run captured on every rank (`--captured-losses`); absent otherwise (added within
    /// schema version 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranks: Option<crate::loss::ranks::RanksReport>,
    pub findings: Vec<Finding>,
    pub verdict: Verdict,
    /// The first `--html-rows` rows with their per-token losses, for the HTML report; not in
    /// the JSON.
    #[serde(skip)]
    pub token_rows: Vec<TokenRow>,
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

/// The lint checks, as the finding codes they can emit with these options.
/// Whether a lint run (or `check`'s rows, never declared shifted) made `check`.
fn lint_ran(check: Check, pad_id: Option<i64>, eos_id: Option<i64>, shifted: bool) -> bool {
    match check {
        Check::Lint => true,
        Check::Unshifted => !shifted,
        Check::Shifted => shifted,
        Check::Eos => eos_id.is_some(),
        Check::PadAndEos => pad_id.is_some() && eos_id.is_some(),
        _ => false,
    }
}

/// The codes whose check `ran` says was made, plus the codes of `findings`, each once, in the
/// order of [`Code::ALL`].
fn with_found(ran: impl Fn(Check) -> bool, findings: &[Finding]) -> Vec<Code> {
    Code::ALL
        .iter()
        .copied()
        .filter(|&c| ran(c.check()) || findings.iter().any(|f| f.code == c))
        .collect()
}

/// The subcommand a report comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandName {
    Check,
    Lint,
}

impl CommandName {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::Check => "check",
            CommandName::Lint => "lint",
        }
    }
}

/// What the CI renderers (JUnit, GitHub annotations) need from either report.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub command: CommandName,
    pub data_path: &'a str,
    /// What the findings' record numbers count.
    pub records: Unit,
    pub findings: &'a [Finding],
    /// The checks that ran, as finding codes (see [`Report::checks`]).
    pub checks: Vec<Code>,
    pub verdict: Verdict,
}

impl Report {
    pub fn outcome(&self) -> Outcome<'_> {
        Outcome {
            command: CommandName::Check,
            data_path: &self.data.path,
            records: self.data.records,
            findings: &self.findings,
            checks: self.checks(),
            verdict: self.verdict,
        }
    }

    /// The checks this run made, named by the finding codes each can emit: the lint checks
    /// (EOS checks with `--eos-id`), the contamination and trained-position checks, the
    /// non-finite check, the model probe when it compared logits, the length check when the
    /// model has an exporter record, the user-loss formulas and probes when a loss was given, the
    /// gradient checks when its weights were recovered, the accumulation check with `--accum` or
    /// `--world-size`; plus any code that was found. `no-padding` is the other outcome of
    /// `padding-contamination`, so it is listed only when found.
    pub fn checks(&self) -> Vec<Code> {
        let eos_id = self.statistics.eos.map(|e| e.id);
        let user = self.user_loss.as_ref();
        let ran = |check| match check {
            Check::Losses => true,
            Check::ModelProbe => self.model.consistency.compared(),
            Check::ExportRecord => self.model.forward_args_source == ArgsSource::Record,
            Check::UserLoss => user.is_some(),
            Check::PaddingProbe => user.is_some_and(|u| u.probes.padding.ran),
            Check::MaskedLogitsProbe => user.is_some_and(|u| u.probes.masked_logits.ran),
            Check::Gradient => user.is_some_and(|u| !u.gradient.batches.is_empty()),
            Check::Steps => self.steps.is_some(),
            other => lint_ran(other, self.data.pad_id, eos_id, false),
        };
        with_found(ran, &self.findings)
    }
}

impl LintReport {
    pub fn outcome(&self) -> Outcome<'_> {
        Outcome {
            command: CommandName::Lint,
            data_path: &self.data.path,
            records: self.data.records,
            findings: &self.findings,
            checks: self.checks(),
            verdict: self.verdict,
        }
    }

    /// The lint checks this run made (see [`Report::checks`]), plus any code found.
    pub fn checks(&self) -> Vec<Code> {
        let d = &self.data;
        with_found(
            |check| lint_ran(check, d.pad_id, d.eos_id, d.shifted),
            &self.findings,
        )
    }
}
