//! `maskaudit check`: stream the dataset through the model and aggregate the per-token losses.
//!
//! The dataset is read one row at a time and processed one batch at a time, so memory does
//! not grow with the number of rows.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;

use anyhow::Result;
use indicatif::ProgressBar;
use tch::Device;

use crate::data::batch::{Batch, Batcher};
use crate::data::capture::CaptureSummary;
use crate::data::{guard, DataError, FieldNames, RowSource, Unit};
use crate::findings::{Code, Finding, SeverityOverrides};
use crate::lint::{LintOptions, LintState, LintStats};
use crate::model::consistency::Consistency;
use crate::model::{
    self, device_name, ArgsSource, DeviceChoice, DtypeChoice, ForwardArg, LoadOptions, LoadedModel,
    Tf32,
};
use crate::report::{DataSummary, ModelInfo, Report, Verdict, SCHEMA_VERSION};
use crate::sys;
use batches::{run_step, RunState, Simulation, StepContext};
use captured::Captured;
use findings::{contamination_finding, data_findings, step_findings, ContaminationEvidence};
use maskaudit_core::loss::aggregate::{relative_change, Aggregates, Contamination, LossTotals};
use maskaudit_core::loss::steps::{StepConfig, StepReport};
use maskaudit_core::loss::user::{LossArg, UserLossReport};
use maskaudit_torch::loss::user::{LossAudit, UserLoss};
use overlap::Overlap;
use packing::Packing;
use read::{read_ahead, Batches, ReadSummary};
use timing::Timing;

mod batches;
mod captured;
mod findings;
mod overlap;
mod packing;
mod policy;
pub mod ranks;
mod read;
mod timing;

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub model: PathBuf,
    pub data: PathBuf,
    pub device: DeviceChoice,
    pub batch_size: usize,
    pub pad_id: Option<i64>,
    pub max_contamination: Option<f64>,
    /// For the lint checks that run on the same rows.
    pub eos_id: Option<i64>,
    pub fields: FieldNames,
    /// Longest JSONL line read (`--max-line-bytes`).
    pub max_line_bytes: usize,
    pub overrides: SeverityOverrides,
    pub loss: Option<LossOptions>,
    /// `--forward-args`: the forward's tensors, when the file has no exporter record.
    pub forward_args: Option<Vec<ForwardArg>>,
    /// The trace-consistency probe on the first batch (off with `--no-model-probe`).
    pub model_probe: bool,
    /// Rows whose per-token losses the report keeps for the HTML view (`--html-rows`; 0
    /// without `--html`).
    pub token_rows: usize,
    /// `--accum`/`--world-size`: simulate optimizer steps over the batches.
    pub steps: Option<StepConfig>,
    /// `--dtype`: the dtype the forward runs in.
    pub dtype: DtypeChoice,
    /// `--tf32`: TF32 for float32 matrix products on CUDA.
    pub tf32: Tf32,
    /// The wall time of each phase on stderr (`MASKAUDIT_TIMING=1`).
    pub timing: bool,
    /// On a GPU, a plain audit keeps one batch in flight (off: `MASKAUDIT_OVERLAP=0`).
    pub overlap: bool,
    /// On a GPU, a plain audit of a model with an exporter record rounds each batch's length
    /// up ([`maskaudit_torch::loss::batch::gpu_columns`]; off: `MASKAUDIT_SHAPE_BUCKETS=0`).
    pub shape_buckets: bool,
}

/// Where the user's loss is: the command line takes exactly one of the two.
#[derive(Debug, Clone)]
pub enum LossSource {
    /// `--loss FILE`.
    File(PathBuf),
    /// `--loss-method NAME`.
    Method(String),
}

/// How to find and judge the user's loss.
#[derive(Debug, Clone)]
pub struct LossOptions {
    pub source: LossSource,
    pub args: Vec<LossArg>,
    /// Whether `--loss-args` was given (rather than the default).
    pub args_given: bool,
    pub rtol: f64,
    pub probes: bool,
    /// `--weights-out`: every row's gradient weights, as JSON lines.
    pub weights_out: Option<WeightsFile>,
    /// `--expect-aggregation`: what a policy loss should compute.
    pub expect_aggregation: Option<maskaudit_core::loss::policy_aggregation::Aggregation>,
}

/// Where `--weights-out` streams: a file the caller opened (and commits or discards at the
/// end), and its name for messages.
#[derive(Debug, Clone)]
pub struct WeightsFile {
    pub shown: String,
    pub file: Arc<File>,
}

/// A `check` run, from options to report: load the model, stream the dataset through it on a
/// reading thread's batches, and draw the findings. Exit codes and rendering are the caller's.
pub fn run(opts: &CheckOptions, progress: &ProgressBar) -> Result<Report> {
    let mut timing = Timing::new(opts.timing);
    model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();
    let policy_kind = policy::kind(opts)?;

    let device = prepare_device(opts.device)?;
    timing.device = device;
    timing.mark("start and the device");
    let model = model::load(&opts.model, device, &load_options(opts))?;
    timing.mark("model load and its first calls");
    // A policy or preference loss audits rollouts, not next-token cross-entropy.
    if let Some(kind) = policy_kind {
        return policy::run(opts, model.as_ref(), kind);
    }
    run_loaded(opts, model.as_ref(), progress, timing)
}

/// [`run`] with a model that is already loaded, of any [`LoadedModel`] implementation: how the
/// tests drive models that exist only in memory (tests/error_model.rs).
pub fn run_with_model(
    opts: &CheckOptions,
    model: &dyn LoadedModel,
    progress: &ProgressBar,
) -> Result<Report> {
    model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();
    let mut timing = Timing::new(opts.timing);
    timing.device = model.device();
    run_loaded(opts, model, progress, timing)
}

/// Long because it is the run's outline, each step a call.
fn run_loaded(
    opts: &CheckOptions,
    model: &dyn LoadedModel,
    progress: &ProgressBar,
    mut timing: Timing,
) -> Result<Report> {
    let device = model.device();
    let tf32 = model::apply_tf32(opts.tf32, device, model.run_kind());
    check_special_ids(opts, model.vocab_size())?;
    let mut audit = open_audit(opts, device)?;
    let mut captured = read_capture(opts)?.map(Captured::new);
    let Reading {
        batches,
        thread: reading,
        path: data_path,
        unit,
    } = start_reading(
        opts,
        model.vocab_size(),
        !model.keeps_documents_apart(),
        captured.as_ref().map(Captured::batch_sizes),
        progress,
    )?;
    timing.mark("the special ids and the reading thread");
    let mut pass = Pass {
        totals: LossTotals::default(),
        run: RunState::new(opts.model_probe, unit),
        simulation: Simulation::default(),
    };
    if captured.is_some() {
        pass.run.trainer_batches = Some(vec![]);
    }
    // Packed rows are counted, and the first run as it is probed, before the batch runs.
    let mut packing = Packing::default();
    let batches = batches.map(|item| {
        let (batch, bytes_read) = item?;
        packing.observe(model, &batch, opts.model_probe)?;
        if let Some(captured) = captured.as_mut() {
            captured.observe(&batch);
        }
        Ok((batch, bytes_read))
    });
    stream(
        model,
        opts,
        batches,
        audit.as_mut(),
        &mut pass,
        progress,
        &mut timing,
    )?;
    let ReadSummary { bytes_read, lint } = reading
        .join()
        .map_err(|_| anyhow::anyhow!("the thread reading {data_path} panicked"))?;
    timing.mark("the reading thread joined");
    progress.set_position(bytes_read);
    if lint.rows() == 0 {
        return Err(DataError::Empty { path: data_path }.into());
    }
    let Pass {
        totals,
        mut run,
        simulation,
    } = pass;
    let losses = totals.aggregates();
    let contamination = totals.contamination();
    let (statistics, lint_findings) = lint.finish();
    let concluded = Conclusion {
        model,
        opts,
        totals: &totals,
        run: &run,
        losses: &losses,
        contamination,
        packing: &packing,
        data_padding_tokens: statistics.padding.tokens,
    };
    let (mut findings, user_loss, steps) = concluded.findings(lint_findings, audit, simulation)?;
    let (mut trainer_verdict, mut logged_steps) = (None, vec![]);
    if let Some(captured) = &captured {
        findings.extend(captured.findings());
        let kept = run.trainer_batches.as_deref().unwrap_or_default();
        let (verdict, trainer_findings) = captured.trainer_findings(kept);
        trainer_verdict = verdict;
        findings.extend(trainer_findings);
        logged_steps = captured.logged_steps(kept);
        findings.extend(captured.logged_findings(&logged_steps));
    }
    opts.overrides.apply(&mut findings);
    let verdict = Verdict::of(&findings);
    timing.mark("findings");

    Ok(Report {
        schema_version: SCHEMA_VERSION,
        model: model_info(model, opts, device, tf32, run.consistency.clone()),
        data: DataSummary {
            packing: packing.summary(),
            capture: captured.as_ref().map(|c| CaptureSummary {
                trainer_verdict,
                logged_steps,
                ..c.summary()
            }),
            ..data_summary(opts, &totals, data_path, unit, &statistics)
        },
        statistics,
        losses,
        contamination,
        user_loss,
        steps,
        ranks: None,
        findings,
        verdict,
        token_rows: std::mem::take(&mut run.token_rows),
    })
}

/// What the findings of a run are drawn from, once its batches have run.
struct Conclusion<'a> {
    model: &'a dyn LoadedModel,
    opts: &'a CheckOptions,
    totals: &'a LossTotals,
    run: &'a RunState,
    losses: &'a Aggregates,
    contamination: Option<Contamination>,
    packing: &'a Packing,
    /// Padding tokens in the rows as read (lint's count, before any split).
    data_padding_tokens: u64,
}

impl Conclusion<'_> {
    /// Every finding, in the report's order (data, model, lint, contamination, user loss,
    /// steps), with the user-loss and step reports they came from.
    fn findings(
        &self,
        lint_findings: Vec<Finding>,
        audit: Option<LossAudit>,
        mut simulation: Simulation,
    ) -> Result<(Vec<Finding>, Option<UserLossReport>, Option<StepReport>)> {
        let (opts, losses) = (self.opts, self.losses);
        let mut findings = data_findings(self.totals);
        findings.extend(self.run.findings(self.model, losses));
        findings.extend(self.packing.findings());
        // The lint checks report it too; this one counts the batches' positions.
        findings.extend(
            lint_findings
                .into_iter()
                .filter(|f| f.code != Code::NoTrainedPositions),
        );
        let (user_loss, loss_findings) = match audit {
            Some(audit) => {
                let sequence_gap = losses
                    .sequence_mean
                    .zip(losses.masked_token_mean)
                    .map(|(s, m)| relative_change(s, m));
                let (report, loss_findings) = audit.finish(sequence_gap)?;
                (Some(report), loss_findings)
            }
            None => (None, vec![]),
        };
        findings.extend(contamination_finding(&ContaminationEvidence {
            contamination: self.contamination,
            targets: self.totals.targets,
            max: opts.max_contamination,
            pad_id: opts.pad_id,
            user_loss: user_loss.as_ref().map(|u| (u, &loss_findings[..])),
            only_split_padding: self.packing.split() && self.data_padding_tokens == 0,
        }));
        findings.extend(loss_findings);
        let steps = opts.steps.map(|config| {
            StepReport::of(
                config,
                opts.batch_size,
                simulation.dropped,
                std::mem::take(&mut simulation.steps),
            )
        });
        if let Some(steps) = &steps {
            findings.extend(step_findings(steps, user_loss.is_some()));
        }
        Ok((findings, user_loss, steps))
    }
}

/// What a pass over the batches accumulates.
struct Pass {
    totals: LossTotals,
    run: RunState,
    simulation: Simulation,
}

/// The batches through the model, a step at a time (W×K micro-batches; one without --accum
/// and --world-size) so that each knows its step's trained-target count before it runs; the
/// last, partial step too. A plain audit on a GPU goes through [`overlap::stream`] instead.
fn stream(
    model: &dyn LoadedModel,
    opts: &CheckOptions,
    batches: impl Iterator<Item = Result<(Batch, u64)>>,
    mut audit: Option<&mut LossAudit>,
    pass: &mut Pass,
    progress: &ProgressBar,
    timing: &mut Timing,
) -> Result<()> {
    let Pass {
        totals,
        run,
        simulation,
    } = pass;
    let overlap = Overlap::new(model.device(), opts, timing.on);
    // A captured run keeps every batch's sums for the trainer's loss (`captured`), which the
    // overlap's path does not.
    if overlap.active && run.trainer_batches.is_none() {
        overlap::stream(
            model,
            opts,
            batches,
            (totals, run),
            progress,
            timing,
            overlap,
        )?;
        timing.cross_entropy(model);
        return Ok(());
    }
    let per_step = opts.steps.map_or(1, |c| c.micro_batches_per_step());
    // Grown as batches arrive: a step's size comes from options, the memory from the data.
    let mut pending = Vec::new();
    for item in batches {
        let (batch, bytes_read) = item?;
        let probing = run.probe && !run.consistency.ran;
        pending.push(batch);
        if pending.len() == per_step {
            let ctx = StepContext {
                model,
                opts,
                full: true,
            };
            run_step(
                &ctx,
                &pending,
                totals,
                run,
                audit.as_deref_mut(),
                simulation,
            )?;
            pending.clear();
            progress.set_position(bytes_read);
            if probing && run.consistency.ran {
                timing.mark("first batch and consistency probe");
            }
        }
    }
    timing.mark("the other batches");
    timing.cross_entropy(model);
    if !pending.is_empty() {
        let ctx = StepContext {
            model,
            opts,
            full: false,
        };
        run_step(&ctx, &pending, totals, run, audit, simulation)?;
    }
    Ok(())
}

/// The device of `--device`, made ready: on the CPU the address space is capped (so an
/// allocation too large fails in libtorch instead of being killed later); on CUDA, NVRTC
/// compiles the fused cross-entropy while the model loads.
fn prepare_device(choice: DeviceChoice) -> Result<Device> {
    let device = choice.resolve()?;
    if device == Device::Cpu {
        sys::cap_address_space();
    }
    if let Device::Cuda(index) = device {
        maskaudit_torch::loss::cuda_ce::prepare_in_background(index);
    }
    Ok(device)
}

/// Padding and end-of-sequence ids go through the embedding like any token: same rule as the
/// data's ids.
fn check_special_ids(opts: &CheckOptions, vocab: i64) -> Result<()> {
    if let Some(pad) = opts.pad_id.filter(|&p| p >= vocab) {
        anyhow::bail!("--pad-id {pad} is outside the model's vocabulary (size {vocab})");
    }
    if let Some(eos) = opts.eos_id.filter(|&e| e >= vocab) {
        anyhow::bail!("--eos-id {eos} is outside the model's vocabulary (size {vocab})");
    }
    Ok(())
}

/// The user-loss audit of `--loss`/`--loss-method`, if asked for.
fn open_audit(opts: &CheckOptions, device: Device) -> Result<Option<LossAudit>> {
    let Some(l) = &opts.loss else {
        return Ok(None);
    };
    let loss = match &l.source {
        LossSource::File(file) => UserLoss::from_file(file, device, l.args.clone())?,
        LossSource::Method(method) => UserLoss::method(method, &opts.model, l.args.clone()),
    };
    let mut audit = LossAudit::new(loss, l.rtol, l.probes, opts.pad_id.unwrap_or(0));
    if let Some(out) = &l.weights_out {
        let file = out
            .file
            .try_clone()
            .map_err(|e| anyhow::anyhow!("--weights-out {}: {e}", out.shown))?;
        audit.write_weights_to(file, &out.shown);
    }
    Ok(Some(audit))
}

/// The dataset being read on its own thread, a few batches ahead.
struct Reading {
    batches: Batches,
    thread: thread::JoinHandle<ReadSummary>,
    path: String,
    unit: Unit,
}

/// The training run captured in DATA (`maskaudit.capture`), when DATA is one: its batches are
/// then the captured micro-batches, whatever `--batch-size` says.
fn read_capture(opts: &CheckOptions) -> Result<Option<crate::data::capture::Capture>> {
    if opts.data.as_os_str() == "-" || !crate::data::capture::is_parquet(&opts.data) {
        return Ok(None);
    }
    crate::data::capture::read(&opts.data)
        .map_err(|e| anyhow::anyhow!("{}: {e}", opts.data.display()))
}

/// Opens the dataset and starts the reading thread, which batches the rows, checks their ids
/// against the vocabulary and runs the lint checks on them.
fn start_reading(
    opts: &CheckOptions,
    vocab: i64,
    split: bool,
    sizes: Option<Vec<usize>>,
    progress: &ProgressBar,
) -> Result<Reading> {
    // Off the main thread: a decoder that stalls on the file's metadata is then an error.
    let (data, fields) = (opts.data.clone(), opts.fields.clone());
    let reader = guard::off_thread(move || RowSource::open(&data, fields))
        .map_err(|line| anyhow::anyhow!(line))??
        .with_max_line_bytes(opts.max_line_bytes);
    if let Some(total) = reader.total_bytes() {
        progress.set_length(total);
    }
    let path = reader.path().to_string();
    let unit = reader.unit();
    let batcher = Batcher::new(opts.batch_size, opts.pad_id, path.clone())
        .with_unit(unit)
        .with_eos_id(opts.eos_id)
        .with_split(split)
        .with_sizes(sizes.unwrap_or_default());
    let lint = LintState::new(LintOptions {
        pad_id: opts.pad_id,
        eos_id: opts.eos_id,
        shifted: false,
        batch_size: Some(opts.batch_size),
        unit,
    });
    let (batches, thread) = read_ahead(reader, batcher, lint, vocab, opts.fields.clone());
    Ok(Reading {
        batches,
        thread,
        path,
        unit,
    })
}

/// The `data` of the report: counts straight from the totals, none derived by subtraction, so
/// none can wrap.
#[deny(clippy::arithmetic_side_effects)]
fn data_summary(
    opts: &CheckOptions,
    totals: &LossTotals,
    path: String,
    unit: Unit,
    statistics: &LintStats,
) -> DataSummary {
    DataSummary {
        path,
        rows: totals.rows,
        batches: totals.batches,
        batch_size: opts.batch_size,
        pad_id: opts.pad_id,
        positions: totals.positions,
        supervised_positions: totals.trained,
        padding_fraction: totals.padding_fraction(),
        padding_target_positions: totals.targets.padding,
        padding_trained_positions: totals.targets.padding_trained,
        untrained_real_target_positions: totals.targets.untrained_real,
        mask_source: statistics.mask_source.clone(),
        records: unit,
        packing: None,
        capture: None,
    }
}

fn model_info(
    model: &dyn LoadedModel,
    opts: &CheckOptions,
    device: Device,
    tf32: bool,
    consistency: Consistency,
) -> ModelInfo {
    ModelInfo {
        path: model::path_string(&opts.model),
        vocab_size: model.vocab_size(),
        device: device_name(device),
        signature: model.signature().key(),
        forward_args: model.signature().args.clone(),
        forward_args_source: model.signature().source,
        forward_args_note: model.signature().note.clone(),
        output: model.output_form(),
        dtype: model.dtype().to_string(),
        run_dtype: model.run_dtype().to_string(),
        tf32,
        cross_entropy: maskaudit_torch::loss::cuda_ce::cross_entropy_used().map(str::to_string),
        architecture: model.record().and_then(|r| r.architecture.clone()),
        max_position_embeddings: model.record().and_then(|r| r.max_position_embeddings),
        consistency,
    }
}

/// Where the forward's arguments come from when the file has no exporter record:
/// `--forward-args`, or the loss arguments of `--loss-method forward` (the forward is the loss).
fn load_options(opts: &CheckOptions) -> LoadOptions {
    if let Some(args) = &opts.forward_args {
        return LoadOptions {
            forward_args: Some((args.clone(), ArgsSource::Option)),
            dtype: opts.dtype.kind(),
        };
    }
    let from_loss = opts.loss.as_ref().and_then(|l| {
        let is_forward = matches!(&l.source, LossSource::Method(m) if m == "forward");
        if !is_forward || !l.args_given {
            return None;
        }
        l.args
            .iter()
            .map(|a| match a {
                LossArg::InputIds => Some(ForwardArg::InputIds),
                LossArg::AttentionMask => Some(ForwardArg::AttentionMask),
                LossArg::Labels => Some(ForwardArg::Labels),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
    });
    LoadOptions {
        forward_args: from_loss.map(|args| (args, ArgsSource::LossArgs)),
        dtype: opts.dtype.kind(),
    }
}
