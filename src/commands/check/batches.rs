//! One optimizer step's batches through the model, the user's loss and the step simulation.

use anyhow::{Context, Result};
use tch::{Kind, Tensor};

use super::CheckOptions;
use crate::data::batch::Batch;
use crate::data::{Pos, Unit};
use crate::findings::{Code, Finding, Severity};
use crate::model::consistency::{self, Consistency, Padding};
use crate::model::{self, LoadedModel};
use crate::report::token_rows::{self, TokenRow};
use maskaudit_core::loss::aggregate::{BatchSums, LossTotals};
use maskaudit_core::loss::steps::{self, MicroBatch, Step, UserMicroBatch};
use maskaudit_core::loss::user::LossArg;
use maskaudit_torch::loss::batch::{batch_losses, BatchTensors};
use maskaudit_torch::loss::user::LossAudit;

/// What `check` learns batch by batch beyond the loss totals.
pub(super) struct RunState {
    /// Per-token losses that were NaN or infinite, and where the first was.
    pub(super) non_finite: u64,
    pub(super) first_non_finite: Option<(usize, usize, f32)>,
    pub(super) longest_batch: usize,
    pub(super) probe: bool,
    pub(super) consistency: Consistency,
    pub(super) unit: Unit,
    /// The first rows with their per-token losses, for the HTML report.
    pub(super) token_rows: Vec<TokenRow>,
    /// For a captured run, every batch's sums, to hold the trainer's loss against the
    /// formulas (`captured`); `None` otherwise.
    pub(super) trainer_batches: Option<Vec<super::captured::TrainerBatch>>,
}

impl RunState {
    pub(super) fn new(probe: bool, unit: Unit) -> Self {
        Self {
            unit,
            non_finite: 0,
            first_non_finite: None,
            longest_batch: 0,
            probe,
            consistency: Consistency::default(),
            token_rows: vec![],
            trainer_batches: None,
        }
    }

    /// A batch of one-token rows, which has no next-token position: counted, nothing run.
    pub(super) fn count_empty(
        &mut self,
        batch: &Batch,
        totals: &mut LossTotals,
        opts: &CheckOptions,
    ) {
        let sums = totals.add_batch(&[], &[], &[], batch.rows);
        self.keep_trainer_batch(batch, &[], &[], sums, 1);
        self.keep_rows(batch, &[], None, opts);
    }

    /// For a captured run, the batch's sums for the trainer's loss (`captured`).
    pub(super) fn keep_trainer_batch(
        &mut self,
        batch: &Batch,
        losses: &[f32],
        mask: &[u8],
        sums: BatchSums,
        vocab: i64,
    ) {
        if let Some(kept) = self.trainer_batches.as_mut() {
            kept.push(super::captured::TrainerBatch::of(
                batch, losses, mask, sums, vocab,
            ));
        }
    }

    /// Keeps the batch's rows, with their losses, while fewer than `limit` are kept.
    pub(super) fn keep_rows(
        &mut self,
        batch: &Batch,
        losses: &[f32],
        weights: Option<&[f64]>,
        opts: &CheckOptions,
    ) {
        let room = opts.token_rows.saturating_sub(self.token_rows.len());
        if room > 0 {
            self.token_rows.extend(token_rows::from_batch(
                batch, losses, weights, self.unit, room,
            ));
        }
    }

    pub(super) fn observe(&mut self, batch: &Batch, losses: &[f32]) {
        self.longest_batch = self.longest_batch.max(batch.seq_len);
        let positions = batch.seq_len.saturating_sub(1);
        for (i, &l) in losses.iter().enumerate() {
            if !l.is_finite() {
                self.non_finite += 1;
                if self.first_non_finite.is_none() {
                    self.first_non_finite = Some((batch.lines[i / positions], i % positions, l));
                }
            }
        }
    }

    /// Findings about the model and the losses it produced.
    pub(super) fn findings(
        &self,
        model: &dyn LoadedModel,
        losses: &maskaudit_core::loss::aggregate::Aggregates,
    ) -> Vec<Finding> {
        let unit = self.unit;
        let mut findings = vec![];
        if let Some((line, t, value)) = self.first_non_finite {
            findings.push(Finding::new(
                Code::NonFiniteLoss,
                Severity::Error,
                format!(
                    "{} per-token loss(es) are NaN or infinite, the first at {}, position {t} (predicting token {}): {value}; every aggregate that includes them is meaningless (logits too large for float32?)",
                    self.non_finite,
                    Pos { unit, n: line }.named(),
                    t + 1
                ),
            ).with_records(vec![line]));
        } else if [
            losses.all_positions_mean,
            losses.masked_token_mean,
            losses.masked_sum_over_all_positions,
            losses.sequence_mean,
            losses.batch_mean_of_means,
            losses.trained_and_padding_mean,
        ]
        .iter()
        .flatten()
        .any(|v| !v.is_finite())
        {
            findings.push(Finding::new(
                Code::NonFiniteLoss,
                Severity::Error,
                "an aggregate of finite per-token losses overflowed to infinity",
            ));
        }
        let c = &self.consistency;
        if c.ran && !c.passed() {
            let part = |name: &str, d: Option<f64>| {
                d.filter(|&d| d > c.tolerance)
                    .map(|d| format!("{name} by {d:.2e}"))
            };
            let moved: Vec<String> = [
                part("when padding columns were appended", c.padding_difference),
                part("when a row ran alone", c.row_difference),
            ]
            .into_iter()
            .flatten()
            .collect();
            let note = if c.note.is_empty() {
                String::new()
            } else {
                format!(" ({})", c.note)
            };
            findings.push(Finding::new(
                Code::ModelNotPadInvariant,
                Severity::Error,
                format!(
                    "logits at real positions of the first batch moved {} (relative; tolerance {:.0e}){note}: the losses of this model cannot be trusted; see `maskaudit explain model-not-pad-invariant`",
                    moved.join(" and "),
                    c.tolerance
                ),
            ));
        }
        if let Some(verified) = model.record().and_then(|r| r.longest_verified()) {
            if self.longest_batch as i64 > verified {
                findings.push(Finding::new(
                    Code::ModelLengthUnverified,
                    Severity::Warning,
                    format!(
                        "batches reach {} positions, but the exporter compared the trace with the eager model only up to {verified}: export again with a longer --trace-length",
                        self.longest_batch
                    ),
                ));
            }
        }
        findings
    }
}

/// What [`run_step`] needs besides the running state.
pub(super) struct StepContext<'a> {
    pub(super) model: &'a dyn LoadedModel,
    pub(super) opts: &'a CheckOptions,
    /// False for the last, partial step.
    pub(super) full: bool,
}

/// The optimizer steps simulated so far.
#[derive(Default)]
pub(super) struct Simulation {
    pub(super) steps: Vec<Step>,
    pub(super) dropped: usize,
}

/// Runs one step's micro-batches and, with `--accum`/`--world-size`, evaluates the step.
pub(super) fn run_step(
    ctx: &StepContext,
    batches: &[Batch],
    totals: &mut LossTotals,
    run: &mut RunState,
    mut audit: Option<&mut LossAudit>,
    simulation: &mut Simulation,
) -> Result<()> {
    let num_items: usize = batches
        .iter()
        .map(|b| b.target_mask().iter().filter(|&&m| m != 0).count())
        .sum();
    let mut micro = Vec::new();
    for batch in batches {
        micro.push(process_batch(
            ctx.model,
            batch,
            totals,
            run,
            audit.as_deref_mut(),
            ctx.opts,
            num_items as i64,
        )?);
    }
    if let Some(config) = ctx.opts.steps {
        if ctx.full || !config.drop_last {
            let index = simulation.steps.len() + 1;
            let takes_count = ctx
                .opts
                .loss
                .as_ref()
                .is_some_and(|l| l.args.contains(&LossArg::NumItemsInBatch));
            simulation
                .steps
                .push(steps::evaluate(index, &micro, config, takes_count));
        } else {
            simulation.dropped += batches.len();
        }
    }
    Ok(())
}

/// Rows past the record's `length_limit` are refused before the forward: past it the forward
/// indexes its position table out of range, which on a GPU is a device-side assert that
/// poisons the CUDA context.
pub(super) fn check_length_limit(
    model: &dyn LoadedModel,
    batch: &Batch,
    unit: Unit,
    line: usize,
) -> Result<()> {
    if let Some(limit) = model.record().and_then(|r| r.length_limit) {
        if batch.seq_len as i64 > limit {
            anyhow::bail!(
                "{}: the batch starting at {} has rows of {} tokens, but the model accepts at most {limit} (its record's length_limit); truncate the rows",
                model.path(),
                Pos { unit, n: line }.named(),
                batch.seq_len
            );
        }
    }
    Ok(())
}

pub(super) fn process_batch(
    model: &dyn LoadedModel,
    batch: &Batch,
    totals: &mut LossTotals,
    run: &mut RunState,
    audit: Option<&mut LossAudit>,
    opts: &CheckOptions,
    num_items: i64,
) -> Result<MicroBatch> {
    let line = batch.lines.first().copied().unwrap_or(0);
    if batch.seq_len < 2 {
        run.count_empty(batch, totals, opts);
        return Ok(MicroBatch {
            line,
            trained: 0,
            masked_loss_sum: 0.0,
            user: None,
        });
    }
    check_length_limit(model, batch, run.unit, line)?;
    let (tensors, logits, losses) = batch_losses(model, batch, &opts.model, run.unit)?;
    run.observe(batch, &losses);
    if run.probe && !run.consistency.ran {
        run.consistency = probe_consistency(model, batch, &tensors, &logits, opts)?;
    }
    let target_mask = batch.target_mask();
    let sums = totals.add_batch(
        &losses,
        &target_mask,
        &batch.padding_target_mask(),
        batch.rows,
    );
    run.keep_trainer_batch(batch, &losses, &target_mask, sums, model.vocab_size());
    let user = match audit {
        Some(audit) => {
            // The user's loss gets the logits in float32, as Hugging Face's loss functions upcast
            // them: what is audited is the loss's formula, and bf16 or f16 arithmetic inside it
            // would differ from maskaudit's float32 cross-entropy by more than its rounding bound.
            let logits = match logits.kind() {
                Kind::Half | Kind::BFloat16 => logits.f_to_kind(Kind::Float)?,
                _ => logits.shallow_clone(),
            };
            let user = audit
                .observe(model, batch, &tensors, &logits, (&losses, &sums), num_items)
                .with_context(|| {
                    format!(
                        "your loss, on the batch starting at {}",
                        Pos {
                            unit: run.unit,
                            n: line
                        }
                        .named()
                    )
                })?;
            run.keep_rows(batch, &losses, user.weights.as_deref(), opts);
            Some(UserMicroBatch {
                value: user.value,
                weights: user.weights,
                mask: target_mask,
            })
        }
        None => {
            run.keep_rows(batch, &losses, None, opts);
            None
        }
    };
    Ok(MicroBatch {
        line,
        trained: sums.trained,
        masked_loss_sum: sums.masked_loss_sum,
        user,
    })
}

/// The trace-consistency probe on the first batch (`model::consistency`), with the limits
/// this run needs.
fn probe_consistency(
    model: &dyn LoadedModel,
    batch: &Batch,
    tensors: &BatchTensors,
    logits: &Tensor,
    opts: &CheckOptions,
) -> Result<Consistency> {
    let probed = consistency::probe(
        model,
        &tensors.input_ids,
        &tensors.attention_mask,
        logits,
        &batch.probe_lengths(),
        opts.pad_id.unwrap_or(0),
        probe_padding(model),
    )?;
    Ok(with_tf32_tolerance(model, probed))
}

/// How far the probe may pad the first batch: no further than a recorded position limit, and
/// on a GPU not at all without one.
pub(super) fn probe_padding(model: &dyn LoadedModel) -> Padding {
    let recorded = model.record().and_then(|r| r.position_limit());
    // Without a recorded position limit, padding columns may take a learned position
    // table out of range: on the CPU the forward fails and the probe says so, but on a GPU
    // that is a device-side assert that poisons the CUDA context for the rest of the run.
    // So on a GPU the padded call needs the record; rows alone are checked either way.
    match recorded {
        Some(limit) => Padding::UpTo(limit),
        None if model.device().is_cuda() => Padding::Off(
            "no padding appended: on a GPU, padding past the model's position table (unknown without a maskaudit-export record) would abort the run",
        ),
        None => Padding::Free,
    }
}

/// TF32 rounds the matrix products' inputs to float16's 10-bit mantissa: float32 logits then
/// get float16's tolerance.
pub(super) fn with_tf32_tolerance(model: &dyn LoadedModel, mut probed: Consistency) -> Consistency {
    if model::allow_tf32_cublas() && model.run_kind() == Kind::Float {
        probed.tolerance = probed.tolerance.max(model::logit_tolerance(Kind::Half));
    }
    probed
}
