//! `maskaudit check`: stream the dataset through the model and aggregate the per-token losses.
//!
//! The dataset is read one row at a time and processed one batch at a time, so memory does
//! not grow with the number of rows.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use tch::{Device, Kind, Tensor};

use crate::aggregate::{relative_difference, Contamination, LossTotals};
use crate::batch::{Batch, Batcher};
use crate::data::{DataError, FieldNames, Pos, Row, RowSource, Unit};
use crate::findings::{Code, Finding, Severity, SeverityOverrides};
use crate::lint::{LintOptions, LintState};
use crate::model::consistency::{self, Consistency};
use crate::model::{
    self, device_name, ArgsSource, CudaEvent, DeviceChoice, DtypeChoice, ForwardArg, LanguageModel,
    LoadOptions, ModelError, Tf32, TorchScriptLm,
};
use crate::report::{DataSummary, ModelInfo, Report, Verdict, SCHEMA_VERSION};
use crate::steps::{
    self, FormulaSummary, MicroBatch, Step, StepConfig, StepFormula, StepReport, UserMicroBatch,
};
use crate::sys;
use crate::token_rows::{self, TokenRow};
use crate::userloss::{LossArg, LossAudit, UserLoss};

/// Relative contamination above which, with no `--max-contamination`, the finding is a warning.
pub const NOTABLE_CONTAMINATION: f64 = 0.01;

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
    pub weights_out: Option<PathBuf>,
}

pub fn run(opts: &CheckOptions, progress: &ProgressBar) -> Result<Report> {
    let mut timing = Timing::from_env();
    model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();

    let device = opts.device.resolve()?;
    if device == Device::Cpu {
        sys::cap_address_space();
    }
    if let Device::Cuda(index) = device {
        // NVRTC compiles the fused cross-entropy while the model loads.
        model::cuda_ce::prepare_in_background(index);
    }
    let model = TorchScriptLm::load(&opts.model, device, &load_options(opts))?;
    let tf32 = model::apply_tf32(opts.tf32, device, model.run_kind());
    if let Some(pad) = opts.pad_id.filter(|&p| p >= model.vocab_size()) {
        // Padding goes through the embedding like any token: same rule as the data's ids.
        anyhow::bail!(
            "--pad-id {pad} is outside the model's vocabulary (size {})",
            model.vocab_size()
        );
    }
    if let Some(eos) = opts.eos_id.filter(|&e| e >= model.vocab_size()) {
        anyhow::bail!(
            "--eos-id {eos} is outside the model's vocabulary (size {})",
            model.vocab_size()
        );
    }
    let mut audit = match &opts.loss {
        Some(l) => {
            let loss = match &l.source {
                LossSource::File(file) => UserLoss::from_file(file, device, l.args.clone())?,
                LossSource::Method(method) => UserLoss::method(method, &opts.model, l.args.clone()),
            };
            let mut audit = LossAudit::new(loss, l.rtol, l.probes, opts.pad_id.unwrap_or(0));
            if let Some(path) = &l.weights_out {
                audit.write_weights_to(path)?;
            }
            Some(audit)
        }
        None => None,
    };
    let reader =
        RowSource::open(&opts.data, opts.fields.clone())?.with_max_line_bytes(opts.max_line_bytes);
    if let Some(total) = reader.total_bytes() {
        progress.set_length(total);
    }
    let data_path = reader.path().to_string();

    let unit = reader.unit();
    let mut run = RunState::new(opts.model_probe, unit);
    let batcher = Batcher::new(opts.batch_size, opts.pad_id, data_path.clone()).with_unit(unit);
    let mut totals = LossTotals::default();
    let vocab = model.vocab_size();
    let lint = LintState::new(LintOptions {
        pad_id: opts.pad_id,
        eos_id: opts.eos_id,
        shifted: false,
        batch_size: Some(opts.batch_size),
        unit,
    });

    let (batches, reading) = read_ahead(reader, batcher, lint, vocab, opts.fields.clone());
    // Batches are taken a step at a time (W×K micro-batches; one without --accum and
    // --world-size) so that each knows its step's trained-target count before it runs.
    let per_step = opts.steps.map_or(1, |c| c.micro_batches_per_step());
    let mut simulation = Simulation::default();
    let mut pending = Vec::with_capacity(per_step);
    // On a GPU, a plain audit (no user loss, no step simulation) keeps one batch in flight:
    // batch k+1 is queued on the device before batch k's losses are read (overlap).
    let mut overlap = Overlap::new(device, opts);
    timing.device = device;
    timing.mark("start, model load and first calls");
    for item in batches {
        let (batch, bytes_read) = match item {
            Ok(item) => item,
            Err(e) => {
                // The batch in flight comes first in the file: its error first.
                overlap.finish(&model, &mut totals, &mut run)?;
                return Err(e);
            }
        };
        if overlap.active && (!run.probe || run.consistency.ran) {
            overlap.push(&model, batch, &mut totals, &mut run, opts)?;
            progress.set_position(bytes_read);
            continue;
        }
        let probing = run.probe && !run.consistency.ran;
        pending.push(batch);
        if pending.len() == per_step {
            let ctx = StepContext {
                model: &model,
                opts,
                full: true,
            };
            run_step(
                &ctx,
                &pending,
                &mut totals,
                &mut run,
                audit.as_mut(),
                &mut simulation,
            )?;
            pending.clear();
            progress.set_position(bytes_read);
            if probing && run.consistency.ran {
                timing.mark("first batch and consistency probe");
            }
        }
    }
    overlap.finish(&model, &mut totals, &mut run)?;
    timing.mark("the other batches");
    if timing.on && device.is_cuda() {
        let _ = writeln!(
            std::io::stderr(),
            "maskaudit timing: cross-entropy {}",
            model::cuda_ce::cross_entropy_used().unwrap_or("none")
        );
    }
    if timing.on
        && model.run_kind() == Kind::BFloat16
        && device.is_cuda()
        && model::cuda_ce::cross_entropy_used() != Some("fused-cuda")
    {
        // A diagnostic on request: straight to stderr.
        let _ = writeln!(
            std::io::stderr(),
            "maskaudit timing: bf16 logits upcast {}",
            if model::bf16_upcast_in_kernel() {
                "inside the log-softmax kernel"
            } else {
                "by a copy (the kernel refused half_to_float)"
            }
        );
    }
    if !pending.is_empty() {
        let ctx = StepContext {
            model: &model,
            opts,
            full: false,
        };
        run_step(
            &ctx,
            &pending,
            &mut totals,
            &mut run,
            audit.as_mut(),
            &mut simulation,
        )?;
    }
    let ReadSummary { bytes_read, lint } = reading
        .join()
        .map_err(|_| anyhow::anyhow!("the thread reading {data_path} panicked"))?;
    progress.set_position(bytes_read);
    if lint.rows() == 0 {
        return Err(DataError::Empty { path: data_path }.into());
    }

    let losses = totals.aggregates();
    let contamination = Contamination::of(&losses);
    let (statistics, lint_findings) = lint.finish();
    let mut findings = data_findings(&totals);
    findings.extend(run.findings(&model, &losses));
    // The lint checks report it too; this one counts the batches' positions.
    findings.extend(
        lint_findings
            .into_iter()
            .filter(|f| f.code != Code::NoTrainedPositions),
    );
    findings.extend(contamination_finding(
        contamination,
        totals.padding_fraction(),
        opts.max_contamination,
    ));
    let user_loss = match audit {
        Some(audit) => {
            let sequence_gap = losses
                .sequence_mean
                .zip(losses.masked_token_mean)
                .map(|(s, m)| relative_difference(s, m));
            let (report, loss_findings) = audit.finish(sequence_gap)?;
            findings.extend(loss_findings);
            Some(report)
        }
        None => None,
    };
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
    opts.overrides.apply(&mut findings);
    let verdict = Verdict::of(&findings);

    Ok(Report {
        schema_version: SCHEMA_VERSION,
        model: ModelInfo {
            path: model::path_string(&opts.model),
            vocab_size: vocab,
            device: device_name(device),
            signature: model.signature().key(),
            forward_args: model.signature().args.clone(),
            forward_args_source: model.signature().source,
            forward_args_note: model.signature().note.clone(),
            output: model.output_form(),
            dtype: model.dtype().to_string(),
            run_dtype: model.run_dtype().to_string(),
            tf32,
            cross_entropy: model::cuda_ce::cross_entropy_used().map(str::to_string),
            architecture: model.record().and_then(|r| r.architecture.clone()),
            max_position_embeddings: model.record().and_then(|r| r.max_position_embeddings),
            consistency: run.consistency.clone(),
        },
        data: DataSummary {
            path: data_path,
            rows: totals.rows,
            batches: totals.batches,
            batch_size: opts.batch_size,
            pad_id: opts.pad_id,
            positions: totals.positions,
            supervised_positions: totals.trained,
            padding_fraction: totals.padding_fraction(),
            padding_positions: run.padding_targets,
            untrained_token_positions: totals.positions - totals.trained - run.padding_targets,
            mask_source: statistics.mask_source.clone(),
            records: unit,
        },
        statistics,
        losses,
        contamination,
        user_loss,
        steps,
        findings,
        verdict,
        token_rows: run.token_rows,
    })
}

/// `MASKAUDIT_TIMING=1`: the wall time of each phase of a run on stderr (for measuring; on a
/// GPU the device is synchronised at each mark).
struct Timing {
    on: bool,
    device: Device,
    last: std::time::Instant,
}

impl Timing {
    fn from_env() -> Self {
        Self {
            on: std::env::var_os("MASKAUDIT_TIMING").is_some_and(|v| v == "1"),
            device: Device::Cpu,
            last: std::time::Instant::now(),
        }
    }

    fn mark(&mut self, what: &str) {
        if !self.on {
            return;
        }
        if let Device::Cuda(n) = self.device {
            tch::Cuda::synchronize(n as i64);
        }
        let now = std::time::Instant::now();
        let _ = writeln!(
            std::io::stderr(),
            "maskaudit timing: {what}: {:.3} s",
            (now - self.last).as_secs_f64()
        );
        self.last = now;
    }
}

/// Batches the reading thread may have ready ahead of the model.
const READ_AHEAD: usize = 2;

/// What the reading thread saw, once it is done.
struct ReadSummary {
    bytes_read: u64,
    /// The lint checks, fed every row on the reading thread; they count the rows and their
    /// mask sources too.
    lint: LintState,
}

/// Reads, validates and batches the rows on a thread of its own, up to [`READ_AHEAD`] batches
/// ahead of the model, so that parsing overlaps the forward pass. Batches arrive in file order,
/// each with the bytes read so far; the first error ends the stream, after the batches before
/// it, so errors surface in the same order as when reading inline. Memory stays bounded: the
/// channel holds at most `READ_AHEAD` batches.
fn read_ahead(
    mut reader: RowSource,
    mut batcher: Batcher,
    lint: LintState,
    vocab: i64,
    fields: FieldNames,
) -> (
    mpsc::Receiver<Result<(Batch, u64)>>,
    thread::JoinHandle<ReadSummary>,
) {
    let (tx, rx) = mpsc::sync_channel(READ_AHEAD);
    let handle = thread::spawn(move || {
        let mut summary = ReadSummary {
            bytes_read: 0,
            lint,
        };
        loop {
            let next = next_batch(&mut reader, &mut batcher, &mut summary, vocab, &fields);
            summary.bytes_read = reader.bytes_read();
            let (item, last) = match next {
                Ok(Some(batch)) => (Ok((batch, summary.bytes_read)), false),
                Ok(None) => return summary,
                Err(e) => (Err(e), true),
            };
            // A closed channel means the model side stopped on an error of its own.
            if tx.send(item).is_err() || last {
                return summary;
            }
        }
    });
    (rx, handle)
}

/// The next full batch, or the last partial one, or `None` at the end of the data.
fn next_batch(
    reader: &mut RowSource,
    batcher: &mut Batcher,
    summary: &mut ReadSummary,
    vocab: i64,
    fields: &FieldNames,
) -> Result<Option<Batch>> {
    while let Some(row) = reader.next() {
        let row = row?;
        check_vocabulary(&row, vocab, reader.path(), reader.unit(), fields)?;
        summary.lint.observe(&row);
        if let Some(batch) = batcher.push(row)? {
            return Ok(Some(batch));
        }
    }
    Ok(batcher.finish()?)
}

/// Token ids must be checked before they reach libtorch: an out-of-range id is an abort on
/// the CPU and poisons the whole CUDA context on a GPU. Labels reach a user's loss as class
/// indices, so they are checked too (negative ones are the lint checks' business).
pub fn check_vocabulary(
    row: &Row,
    vocab: i64,
    path: &str,
    unit: Unit,
    fields: &FieldNames,
) -> Result<(), DataError> {
    let columns = [
        (&fields.input_ids, Some(&row.input_ids)),
        (&fields.labels, row.labels.as_ref()),
    ];
    for (field, ids) in columns {
        let Some(ids) = ids else { continue };
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id >= vocab) {
            return Err(DataError::Field {
                path: path.to_string(),
                at: Pos { unit, n: row.line },
                field: field.to_string(),
                message: format!(
                    "token id {id} at index {i} is outside the model's vocabulary (size {vocab})"
                ),
            });
        }
    }
    Ok(())
}

/// Batch tensors on the model's device.
#[derive(Debug)]
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

impl BatchTensors {
    /// On a GPU the rows are copied into pinned (page-locked) host memory and uploaded with a
    /// non-blocking copy: queued behind the work already on the device, without the host
    /// waiting for that work to finish, as a copy from pageable memory makes it wait.
    /// libtorch's pinned-memory allocator keeps the host buffer until the copy has run.
    pub fn new(batch: &Batch, device: Device) -> Result<Self, tch::TchError> {
        let shape = [batch.rows as i64, batch.seq_len as i64];
        let upload = |v: &[i64]| -> Result<Tensor, tch::TchError> {
            let host = Tensor::f_from_slice(v)?.f_view(shape)?;
            if device.is_cuda() {
                host.f_internal_pin_memory(device)?
                    .f_to_device_(device, Kind::Int64, true, false)
            } else {
                host.f_to_device(device)
            }
        };
        Ok(Self {
            input_ids: upload(&batch.input_ids)?,
            attention_mask: upload(&batch.attention_mask)?,
        })
    }
}

/// Runs one batch through the model and returns its per-token losses `[B, T-1]` as a host
/// vector. Also the building block of the user-loss audit.
pub fn batch_losses<M: LanguageModel>(
    model: &M,
    batch: &Batch,
    model_path: &std::path::Path,
    unit: Unit,
) -> Result<(BatchTensors, Tensor, Vec<f32>)> {
    let path = model::path_string(model_path);
    let first_line = batch.lines.first().copied().unwrap_or(0);
    let at = Pos {
        unit,
        n: first_line,
    };
    check_memory(model, batch, &path, at)?;
    let tensors = BatchTensors::new(batch, model.device())?;
    let logits = model
        .logits(&tensors.input_ids, &tensors.attention_mask)
        .map_err(|e| match e {
            ModelError::Torch(message) => ModelError::Forward {
                path: path.clone(),
                line: first_line,
                message,
            },
            other => other,
        })?;
    let in_batch = |e: tch::TchError| ModelError::Forward {
        path: path.clone(),
        line: first_line,
        message: model::torch_message(&e.to_string()),
    };
    let losses = model::token_losses(&logits, &tensors.input_ids, model::CHUNK_ELEMENTS)
        .map_err(in_batch)?
        .ok_or(ModelError::NonFinite {
            path: path.clone(),
            line: first_line,
        })?;
    let host: Vec<f32> = Vec::try_from(
        losses
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .and_then(|t| t.f_flatten(0, -1))
            .map_err(in_batch)?,
    )
    .context("copying per-token losses to the host")?;
    Ok((tensors, logits, host))
}

/// What the forward of a batch will at least allocate: its logits, plus an f32 copy for the
/// cross-entropy when they are in another dtype. A batch that cannot fit is refused before
/// the forward, with the option that fixes it, rather than killed by the kernel halfway.
/// Only on the CPU: MemAvailable says nothing about a GPU.
fn check_memory<M: LanguageModel>(
    model: &M,
    batch: &Batch,
    path: &str,
    at: Pos,
) -> Result<(), ModelError> {
    if model.device() != Device::Cpu {
        return Ok(());
    }
    let Some(available) = sys::available_memory() else {
        return Ok(());
    };
    let elements = (batch.rows as u128) * (batch.seq_len as u128) * (model.vocab_size() as u128);
    let need = elements.saturating_mul(4);
    if need > available as u128 {
        return Err(ModelError::Memory {
            path: path.to_string(),
            at: at.named(),
            need: sys::human_bytes(u64::try_from(need).unwrap_or(u64::MAX)),
            shape: format!(
                "[{}, {}, {}]",
                batch.rows,
                batch.seq_len,
                model.vocab_size()
            ),
            available: sys::human_bytes(available),
        });
    }
    Ok(())
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

/// What `check` learns batch by batch beyond the loss totals.
struct RunState {
    /// Next-token positions whose target is padding (attention 0), as opposed to real tokens
    /// left untrained (prompts).
    padding_targets: u64,
    /// Per-token losses that were NaN or infinite, and where the first was.
    non_finite: u64,
    first_non_finite: Option<(usize, usize, f32)>,
    longest_batch: usize,
    probe: bool,
    consistency: Consistency,
    unit: Unit,
    /// The first rows with their per-token losses, for the HTML report.
    token_rows: Vec<TokenRow>,
}

impl RunState {
    fn new(probe: bool, unit: Unit) -> Self {
        Self {
            unit,
            padding_targets: 0,
            non_finite: 0,
            first_non_finite: None,
            longest_batch: 0,
            probe,
            consistency: Consistency::default(),
            token_rows: vec![],
        }
    }

    /// Keeps the batch's rows, with their losses, while fewer than `limit` are kept.
    fn keep_rows(
        &mut self,
        batch: &Batch,
        losses: &[f32],
        weights: Option<&[f64]>,
        opts: &CheckOptions,
    ) {
        let room = opts.token_rows.saturating_sub(self.token_rows.len());
        if room > 0 {
            self.token_rows.extend(token_rows::from_batch(
                batch,
                losses,
                weights,
                self.unit,
                opts.pad_id,
                opts.eos_id,
                room,
            ));
        }
    }

    fn observe(&mut self, batch: &Batch, losses: &[f32]) {
        self.padding_targets += batch.padding_targets() as u64;
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
    fn findings(
        &self,
        model: &TorchScriptLm,
        losses: &crate::aggregate::Aggregates,
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
struct StepContext<'a> {
    model: &'a TorchScriptLm,
    opts: &'a CheckOptions,
    /// False for the last, partial step.
    full: bool,
}

/// The optimizer steps simulated so far.
#[derive(Default)]
struct Simulation {
    steps: Vec<Step>,
    dropped: usize,
}

/// Runs one step's micro-batches and, with `--accum`/`--world-size`, evaluates the step.
fn run_step(
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
    let mut micro = Vec::with_capacity(batches.len());
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
fn check_length_limit(model: &TorchScriptLm, batch: &Batch, unit: Unit, line: usize) -> Result<()> {
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

fn process_batch(
    model: &TorchScriptLm,
    batch: &Batch,
    totals: &mut LossTotals,
    run: &mut RunState,
    audit: Option<&mut LossAudit>,
    opts: &CheckOptions,
    num_items: i64,
) -> Result<MicroBatch> {
    let line = batch.lines.first().copied().unwrap_or(0);
    if batch.seq_len < 2 {
        // One-token rows have no next-token position: nothing to run.
        totals.add_batch(&[], &[], batch.rows);
        run.keep_rows(batch, &[], None, opts);
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
        let recorded = model.record().and_then(|r| r.position_limit());
        // Without a recorded position limit, padding columns may take a learned position
        // table out of range: on the CPU the forward fails and the probe says so, but on a GPU
        // that is a device-side assert that poisons the CUDA context for the rest of the run.
        // So on a GPU the padded call needs the record; rows alone are checked either way.
        let unknown_on_gpu = recorded.is_none() && model.device().is_cuda();
        let limit = if unknown_on_gpu {
            Some(batch.seq_len as i64)
        } else {
            recorded
        };
        run.consistency = consistency::probe(
            model,
            &tensors.input_ids,
            &tensors.attention_mask,
            &logits,
            &batch.row_lengths(),
            opts.pad_id.unwrap_or(0),
            limit,
        )?;
        if unknown_on_gpu {
            run.consistency.note = run.consistency.note.replace(
                "the batch is at the model's position limit: no padding appended",
                "no padding appended: on a GPU, padding past the model's position table (unknown without a maskaudit-export record) would abort the run",
            );
        }
        if model::allow_tf32_cublas() && model.run_kind() == Kind::Float {
            // TF32 rounds the matrix products' inputs to float16's 10-bit mantissa.
            run.consistency.tolerance = run
                .consistency
                .tolerance
                .max(model::logit_tolerance(Kind::Half));
        }
    }
    let target_mask = batch.target_mask();
    let sums = totals.add_batch(&losses, &target_mask, batch.rows);
    let user = match audit {
        Some(audit) => {
            // The user's loss gets the logits in float32, as Hugging Face's loss functions upcast
            // them: what is audited is the loss's formula, and bf16 or f16 arithmetic inside it
            // would differ from maskaudit's float32 cross-entropy by more than --rtol.
            let logits = match logits.kind() {
                Kind::Half | Kind::BFloat16 => logits.f_to_kind(Kind::Float)?,
                _ => logits.shallow_clone(),
            };
            let user = audit.observe(model, batch, &tensors, &logits, &sums, num_items)?;
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

/// One batch in flight on a GPU: its losses are computed and copied (non-blocking, into pinned
/// host memory) on the device's queue, and an event marks the end of that copy. The host reads
/// them only after it has queued the next batch, so the GPU goes from one batch's work to the
/// next without waiting for the host to read losses, aggregate, take the next batch and upload
/// it. Used for a plain audit on CUDA (no user loss, no step simulation, which need each batch's
/// logits or results in turn), after the batch that ran the consistency probe; the environment
/// variable `MASKAUDIT_OVERLAP=0` turns it off (for measuring it).
struct Overlap {
    active: bool,
    device_index: usize,
    in_flight: Option<InFlight>,
}

/// A batch whose losses are on their way to the host.
struct InFlight {
    batch: Batch,
    /// f32 `[B·(T-1)]` and a bool scalar, in host memory once `done` has completed.
    losses: Tensor,
    finite: Tensor,
    /// `None` when CUDA events are not at hand: reading `losses` then waits for the device.
    done: Option<CudaEvent>,
}

impl Overlap {
    fn new(device: Device, opts: &CheckOptions) -> Self {
        let device_index = match device {
            Device::Cuda(n) => Some(n),
            _ => None,
        };
        let off = std::env::var_os("MASKAUDIT_OVERLAP").is_some_and(|v| v == "0");
        Self {
            active: device_index.is_some() && opts.loss.is_none() && opts.steps.is_none() && !off,
            device_index: device_index.unwrap_or(0),
            in_flight: None,
        }
    }

    /// Queues `batch` on the device, then reads the batch queued before it.
    fn push(
        &mut self,
        model: &TorchScriptLm,
        batch: Batch,
        totals: &mut LossTotals,
        run: &mut RunState,
        opts: &CheckOptions,
    ) -> Result<()> {
        let queued = self.queue(model, batch, run, opts);
        // Errors in file order: the batch before this one first.
        let previous = self.in_flight.take();
        if let Some(previous) = previous {
            self.read(previous, model, totals, run)?;
        }
        match queued? {
            Queued::InFlight(next) => self.in_flight = Some(next),
            Queued::Empty(batch) => {
                totals.add_batch(&[], &[], batch.rows);
            }
        }
        Ok(())
    }

    /// Reads the last batch in flight.
    fn finish(
        &mut self,
        model: &TorchScriptLm,
        totals: &mut LossTotals,
        run: &mut RunState,
    ) -> Result<()> {
        match self.in_flight.take() {
            Some(last) => self.read(last, model, totals, run),
            None => Ok(()),
        }
    }

    fn queue(
        &self,
        model: &TorchScriptLm,
        batch: Batch,
        run: &RunState,
        opts: &CheckOptions,
    ) -> Result<Queued> {
        let line = batch.lines.first().copied().unwrap_or(0);
        if batch.seq_len < 2 {
            return Ok(Queued::Empty(batch));
        }
        check_length_limit(model, &batch, run.unit, line)?;
        let path = model::path_string(&opts.model);
        let tensors = BatchTensors::new(&batch, model.device())?;
        let in_batch = |e: tch::TchError| ModelError::Forward {
            path: path.clone(),
            line,
            message: model::torch_message(&e.to_string()),
        };
        let logits = model
            .logits(&tensors.input_ids, &tensors.attention_mask)
            .map_err(|e| match e {
                ModelError::Torch(message) => ModelError::Forward {
                    path: path.clone(),
                    line,
                    message,
                },
                other => other,
            })?;
        let (losses, finite) = if logits.is_contiguous()
            && matches!(logits.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        {
            let q = model::queue_flat_token_losses(
                &logits,
                &tensors.input_ids,
                model::CUDA_CHUNK_ELEMENTS,
            )
            .map_err(in_batch)?;
            (q.losses, q.finite)
        } else {
            // Other logits take the synchronous path; the finiteness is known already.
            let losses = model::token_losses(&logits, &tensors.input_ids, model::CHUNK_ELEMENTS)
                .map_err(in_batch)?
                .ok_or(ModelError::NonFinite {
                    path: path.clone(),
                    line,
                })?;
            let finite = Tensor::f_from_slice(&[true]).map_err(in_batch)?;
            (losses, finite)
        };
        drop(logits);
        let to_host = |t: &Tensor| {
            t.f_flatten(0, -1)
                .and_then(|t| t.f_to_device_(Device::Cpu, t.kind(), true, false))
                .map_err(in_batch)
        };
        let losses = to_host(&losses)?;
        let finite = to_host(&finite)?;
        let done = CudaEvent::record(self.device_index);
        Ok(Queued::InFlight(InFlight {
            batch,
            losses,
            finite,
            done,
        }))
    }

    fn read(
        &self,
        flight: InFlight,
        model: &TorchScriptLm,
        totals: &mut LossTotals,
        run: &mut RunState,
    ) -> Result<()> {
        match &flight.done {
            Some(event) => event.wait().map_err(anyhow::Error::msg)?,
            None => tch::Cuda::synchronize(self.device_index as i64),
        }
        let losses = Vec::<f32>::try_from(&flight.losses)?;
        if !bool::try_from(&flight.finite)? {
            return Err(ModelError::NonFinite {
                path: model.path().to_string(),
                line: flight.batch.lines.first().copied().unwrap_or(0),
            }
            .into());
        }
        Self::account(&flight.batch, &losses, totals, run);
        Ok(())
    }

    fn account(batch: &Batch, losses: &[f32], totals: &mut LossTotals, run: &mut RunState) {
        run.observe(batch, losses);
        totals.add_batch(losses, &batch.target_mask(), batch.rows);
    }
}

enum Queued {
    InFlight(InFlight),
    /// One-token rows: no next-token position, nothing to run.
    Empty(Batch),
}

/// `accumulation-misweighted`: an error when the user's loss, run per micro-batch as a trainer
/// runs it, misweights a step; information on what the common formulas would do otherwise.
fn step_findings(steps: &StepReport, has_loss: bool) -> Vec<Finding> {
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
fn data_findings(totals: &LossTotals) -> Vec<Finding> {
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

    fn lint() -> LintState {
        LintState::new(LintOptions {
            pad_id: Some(0),
            eos_id: None,
            shifted: false,
            batch_size: Some(2),
            unit: Unit::Line,
        })
    }

    #[test]
    fn read_ahead_sends_batches_in_order_then_the_first_error() {
        let data = b"{\"input_ids\":[1,2]}\n{\"input_ids\":[3]}\n{\"input_ids\":[4,5,6]}\n{\"input_ids\":[7,99]}\n{\"input_ids\":[8]}\n";
        let reader = RowSource::from_jsonl_bytes("d.jsonl", data.to_vec(), FieldNames::default());
        let batcher = Batcher::new(2, Some(0), "d.jsonl");
        let (batches, reading) = read_ahead(reader, batcher, lint(), 50, FieldNames::default());
        let items: Vec<_> = batches.into_iter().collect();
        assert_eq!(items.len(), 2);
        let (first, _) = items[0].as_ref().unwrap();
        assert_eq!((first.lines.clone(), first.seq_len), (vec![1, 2], 2));
        let err = items[1].as_ref().unwrap_err().to_string();
        assert!(
            err.starts_with("d.jsonl:4: input_ids: token id 99"),
            "{err}"
        );
        let summary = reading.join().unwrap();
        assert_eq!(summary.lint.rows(), 3);

        let reader = RowSource::from_jsonl_bytes("d.jsonl", data.to_vec(), FieldNames::default());
        let batcher = Batcher::new(2, Some(0), "d.jsonl");
        let (batches, reading) = read_ahead(reader, batcher, lint(), 100, FieldNames::default());
        let rows: Vec<usize> = batches.into_iter().map(|b| b.unwrap().0.rows).collect();
        assert_eq!(rows, vec![2, 2, 1]);
        let summary = reading.join().unwrap();
        assert_eq!(
            (summary.lint.rows(), summary.bytes_read),
            (5, data.len() as u64)
        );
    }

    struct HugeVocab;

    impl LanguageModel for HugeVocab {
        fn vocab_size(&self) -> i64 {
            1 << 40
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn logits(&self, _: &Tensor, _: &Tensor) -> Result<Tensor, ModelError> {
            unreachable!("refused before the forward")
        }
    }

    #[test]
    fn a_batch_whose_logits_cannot_fit_is_refused_with_the_fix() {
        let batch = Batcher::new(1, Some(0), "d.jsonl")
            .push(Row::new(7, vec![1, 2, 3]))
            .unwrap()
            .expect("a batch of one row");
        let err = batch_losses(&HugeVocab, &batch, std::path::Path::new("m.pt"), Unit::Line)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("m.pt: the batch starting at line 7 needs 12288.0 GiB for its logits [1, 3, 1099511627776]"),
            "{err}"
        );
        assert!(err.ends_with("lower --batch-size"), "{err}");
    }

    #[test]
    fn vocabulary_check_names_line_and_index() {
        let fields = FieldNames::default();
        let row = Row::new(12, vec![1, 2, 48]);
        let err = check_vocabulary(&row, 48, "d.jsonl", Unit::Line, &fields).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.jsonl:12: input_ids: token id 48 at index 2 is outside the model's vocabulary (size 48)"
        );
        assert!(check_vocabulary(&row, 49, "d.jsonl", Unit::Line, &fields).is_ok());
        let mut row = Row::new(3, vec![1, 2, 3]);
        row.labels = Some(vec![-100, 2, 49]);
        let err = check_vocabulary(&row, 49, "d.jsonl", Unit::Line, &fields).unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.jsonl:3: labels: token id 49 at index 2 is outside the model's vocabulary (size 49)"
        );
        row.labels = Some(vec![-100, 2, -100]);
        assert!(check_vocabulary(&row, 49, "d.jsonl", Unit::Line, &fields).is_ok());
    }
}
