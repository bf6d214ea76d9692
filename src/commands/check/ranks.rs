//! `check --captured-losses PATH [MODEL]`: a run captured on every rank, audited from the
//! per-token losses the run recorded, without a model.
//!
//! PATH is a directory holding one run's `<name>.rank<r>.parquet` files (one a rank), one of
//! those files (its siblings join it), or a single-process capture. Each rank's micro-batches
//! are batched as captured; their recorded losses stand in for a model's, so every aggregate,
//! the captured-run checks (`captured`) and the cross-rank audit (`loss::ranks`) come from
//! them. With MODEL, the model's own losses on the same batches are compared with the
//! recorded ones: the trace is faithful to the run, or `captured-losses-mismatch`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use indicatif::ProgressBar;

use super::captured::{Captured, TrainerBatch};
use super::findings::{contamination_finding, data_findings, ContaminationEvidence};
use super::read::{read_ahead, ReadSummary};
use super::{model_info, prepare_device, CheckOptions};
use crate::data::batch::{Batch, Batcher};
use crate::data::capture::{self, Capture, CaptureSummary};
use crate::data::{token_losses, Pos, RowSource, Unit};
use crate::findings::{Code, Finding, Severity};
use crate::lint::{LintOptions, LintState};
use crate::model::{self, ArgsSource, LoadOptions, LoadedModel, OutputForm};
use crate::report::{DataSummary, ModelInfo, Report, Verdict, SCHEMA_VERSION};
use maskaudit_core::loss::aggregate::LossTotals;
use maskaudit_core::loss::ranks::{
    self, CountKind, CrossCheck, RankFormula, RankMicroBatch, RanksReport,
};
use maskaudit_torch::loss::batch::batch_losses;

/// How far a model's per-token loss may be from the recorded one: relative to the loss, plus
/// an absolute floor. A float32 run and a float32 trace of the same weights agree to about
/// 1e-6; other kernels (fused, chunked) to about 1e-5; different weights or a different model
/// by far more. A run under bf16 autocast is outside it, and is reported.
const CROSS_CHECK_RTOL: f64 = 1e-3;
const CROSS_CHECK_ATOL: f64 = 1e-4;

/// One rank's capture file.
struct RankFile {
    path: PathBuf,
    capture: Capture,
    rank: i64,
}

/// The audit of the captures at `opts.data`; `with_model` when `opts.model` names a model to
/// cross-check the recorded losses against.
/// Long because it is the run's outline: the files, each rank's batches, the findings and
/// the report, each a call.
pub fn run(opts: &CheckOptions, with_model: bool, progress: &ProgressBar) -> Result<Report> {
    if opts.loss.is_some() || opts.steps.is_some() {
        bail!("--captured-losses audits the run as it was captured: it takes no --loss, --loss-method, --accum or --world-size");
    }
    let files = rank_files(&opts.data)?;
    let world_size = files.len();
    let first = &files[0].capture;
    let loaded = if with_model {
        model::configure_libtorch();
        let device = prepare_device(opts.device)?;
        let options = LoadOptions {
            forward_args: opts.forward_args.clone().map(|a| (a, ArgsSource::Option)),
            dtype: opts.dtype.kind(),
        };
        Some(model::load(&opts.model, device, &options)?)
    } else {
        None
    };
    // Only the cross-check touches libtorch: the audit itself is plain sums.
    let _no_grad = loaded.as_ref().map(|_| tch::no_grad_guard());
    let model = loaded.as_deref();
    let vocab = match model {
        Some(m) => m.vocab_size(),
        None => first.settings["vocab_size"].as_i64().unwrap_or(i64::MAX),
    };
    let merged = Capture {
        micro_batches: files
            .iter()
            .flat_map(|f| f.capture.micro_batches.clone())
            .collect(),
        settings: first.settings.clone(),
    };
    let mut captured = Captured::new(merged.clone());
    let mut state = State {
        totals: LossTotals::default(),
        kept: vec![],
        sums: vec![],
        cross: model.map(|_| CrossCheck::default()),
        lint: Some(LintState::new(LintOptions {
            pad_id: opts.pad_id,
            eos_id: opts.eos_id,
            shifted: false,
            batch_size: None,
            unit: Unit::Row,
        })),
    };
    for file in &files {
        read_rank(
            opts,
            file,
            vocab,
            model,
            &mut captured,
            &mut state,
            progress,
        )?;
    }
    let lint = state
        .lint
        .take()
        .expect("the lint state comes back after each rank");
    if lint.rows() == 0 {
        bail!("{}: the captures hold no rows", opts.data.display());
    }
    let micro: Vec<RankMicroBatch> = merged
        .micro_batches
        .iter()
        .zip(&state.sums)
        .map(|(m, &(trained, sum))| RankMicroBatch {
            rank: m.rank,
            step: m.step,
            trained,
            masked_loss_sum: sum,
            trainer_loss: m.trainer_loss,
            num_items: m.num_items,
        })
        .collect();
    let mut report_ranks = ranks::audit(&micro, world_size);
    report_ranks.cross_check = state.cross;

    let totals = &state.totals;
    let losses = totals.aggregates();
    let contamination = totals.contamination();
    let (statistics, lint_findings) = lint.finish();
    let mut findings = data_findings(totals);
    findings.extend(
        lint_findings
            .into_iter()
            .filter(|f| f.code != Code::NoTrainedPositions),
    );
    findings.extend(contamination_finding(&ContaminationEvidence {
        contamination,
        targets: totals.targets,
        max: opts.max_contamination,
        pad_id: opts.pad_id,
        user_loss: None,
        only_split_padding: false,
    }));
    let (verdict, trainer_findings) = captured.trainer_findings(&state.kept);
    findings.extend(trainer_findings);
    let logged_steps = captured.logged_steps(&state.kept);
    findings.extend(captured.logged_findings(&logged_steps));
    findings.extend(rank_findings(&report_ranks));
    opts.overrides.apply(&mut findings);
    let shown = opts.data.display().to_string();
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        model: match model {
            Some(m) => model_info(m, opts, m.device(), false, Default::default()),
            None => no_model(vocab),
        },
        data: DataSummary {
            capture: Some(CaptureSummary {
                trainer_verdict: verdict,
                logged_steps,
                counts_compared: report_ranks
                    .steps
                    .iter()
                    .flat_map(|s| &s.ranks)
                    .filter(|r| r.counted.is_some())
                    .count() as u64,
                steps: report_ranks.steps.len() as u64,
                ..captured.summary()
            }),
            ..super::data_summary(opts, totals, shown, Unit::Row, &statistics)
        },
        statistics,
        losses,
        contamination,
        user_loss: None,
        steps: None,
        verdict: Verdict::of(&findings),
        findings,
        token_rows: vec![],
        ranks: Some(report_ranks),
    })
}

/// What the ranks' batches accumulate.
struct State {
    totals: LossTotals,
    /// Every batch's sums, for the trainer's loss (`captured`).
    kept: Vec<TrainerBatch>,
    /// Each micro-batch's (trained targets, masked loss sum), in the merged capture's order.
    sums: Vec<(u64, f64)>,
    cross: Option<CrossCheck>,
    /// Carried from rank to rank: one set of lint checks over every row.
    lint: Option<LintState>,
}

/// One rank's micro-batches with their recorded losses.
fn read_rank(
    opts: &CheckOptions,
    file: &RankFile,
    vocab: i64,
    model: Option<&dyn LoadedModel>,
    captured: &mut Captured,
    state: &mut State,
    progress: &ProgressBar,
) -> Result<()> {
    let shown = file.path.display().to_string();
    let recorded = token_losses::read(&file.path).map_err(|e| anyhow!("{shown}: {e}"))?;
    let reader = RowSource::open(&file.path, opts.fields.clone())?;
    if let Some(total) = reader.total_bytes() {
        progress.set_length(total);
    }
    let unit = reader.unit();
    let batcher = Batcher::new(opts.batch_size, opts.pad_id, shown.clone())
        .with_unit(unit)
        .with_eos_id(opts.eos_id)
        .with_sizes(file.capture.batch_sizes());
    let lint = state.lint.take().expect("the lint state is carried");
    let (batches, reading) = read_ahead(reader, batcher, lint, vocab, opts.fields.clone());
    let mut row = 0;
    for item in batches {
        let (batch, bytes) = item?;
        let losses = batch_recorded(&batch, &recorded, row)
            .map_err(|e| anyhow!("{shown}: row {}: {e}", row + 1))?;
        row += batch.rows;
        let mask = batch.target_mask();
        let sums = state
            .totals
            .add_batch(&losses, &mask, &batch.padding_target_mask(), batch.rows);
        captured.observe(&batch);
        state
            .kept
            .push(TrainerBatch::of(&batch, &losses, &mask, sums, vocab));
        state.sums.push((sums.trained, sums.masked_loss_sum));
        if let (Some(model), Some(cross)) = (model, state.cross.as_mut()) {
            cross_check(model, opts, &batch, &losses, file.rank, cross)?;
        }
        progress.set_position(bytes);
    }
    let ReadSummary { lint, .. } = reading
        .join()
        .map_err(|_| anyhow!("the thread reading {shown} panicked"))?;
    state.lint = Some(lint);
    Ok(())
}

/// The recorded losses of the batch's rows, `[B, T-1]` row-major, checked against its width.
fn batch_recorded(batch: &Batch, recorded: &[Vec<f32>], first: usize) -> Result<Vec<f32>, String> {
    let width = batch.seq_len.saturating_sub(1);
    let mut out = Vec::with_capacity(batch.rows * width);
    for r in 0..batch.rows {
        let row = recorded
            .get(first + r)
            .ok_or("more rows than recorded losses")?;
        if row.len() != width {
            return Err(format!(
                "{} recorded token losses for a micro-batch of {} positions (T-1 = {width} expected)",
                row.len(),
                batch.seq_len
            ));
        }
        out.extend_from_slice(row);
    }
    Ok(out)
}

/// The model's losses on one batch against the recorded ones.
fn cross_check(
    model: &dyn LoadedModel,
    opts: &CheckOptions,
    batch: &Batch,
    recorded: &[f32],
    rank: i64,
    cross: &mut CrossCheck,
) -> Result<()> {
    // Packed rows that the model cannot keep apart would be split: not the run's rows.
    if batch.seq_len < 2 || (!batch.packed_rows.is_empty() && !model.keeps_documents_apart()) {
        cross.skipped += 1;
        return Ok(());
    }
    let (_, _, losses) = batch_losses(model, batch, &opts.model, Unit::Row)?;
    cross.batches += 1;
    for (i, (&ours, &theirs)) in losses.iter().zip(recorded).enumerate() {
        let (ours, theirs) = (f64::from(ours), f64::from(theirs));
        let gap = (ours - theirs).abs();
        let excess = gap / (CROSS_CHECK_ATOL + CROSS_CHECK_RTOL * theirs.abs());
        if gap > cross.max_difference || !gap.is_finite() {
            cross.max_difference = gap;
        }
        if excess > 1.0 && cross.first_off.is_none() {
            let width = batch.seq_len - 1;
            cross.first_off = Some(ranks::Off {
                rank,
                row: batch.lines[i / width],
                position: i % width,
                recorded: theirs,
                model: ours,
            });
        }
        if excess > 1.0 {
            cross.positions_off += 1;
        }
    }
    Ok(())
}

/// Finds the capture files of PATH, one a rank, each checked: a capture, with one world size,
/// every rank once. Errors are one line (exit 2).
fn rank_files(path: &Path) -> Result<Vec<RankFile>> {
    let shown = path.display();
    let candidates = candidates(path)?;
    if candidates.is_empty() {
        bail!("--captured-losses {shown}: no .parquet capture in the directory");
    }
    let stems: std::collections::BTreeSet<String> = candidates
        .iter()
        .map(|p| rank_of_name(p).map_or_else(|| p.display().to_string(), |(s, _)| s))
        .collect();
    if stems.len() > 1 {
        bail!(
            "--captured-losses {shown}: the captures of several runs ({}): give one run's directory or file",
            stems.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let mut files = vec![];
    for p in candidates {
        let Some(capture) = capture::read(&p).map_err(|e| anyhow!("{}: {e}", p.display()))? else {
            bail!(
                "{}: not a maskaudit capture (no {} metadata)",
                p.display(),
                capture::META_KEY
            );
        };
        let rank = capture.settings["rank"].as_i64().unwrap_or(0);
        files.push(RankFile {
            path: p,
            capture,
            rank,
        });
    }
    let world = files[0].capture.world_size();
    if let Some(other) = files.iter().find(|f| f.capture.world_size() != world) {
        bail!(
            "{}: world size {} where {} says {world}: captures of different runs",
            other.path.display(),
            other.capture.world_size(),
            files[0].path.display()
        );
    }
    files.sort_by_key(|f| f.rank);
    for (want, f) in (0..world).zip(files.iter().map(|f| f.rank).chain(std::iter::repeat(-1))) {
        if f != want {
            bail!(
                "--captured-losses {shown}: rank {want} of world size {world} is missing (each rank writes <name>.rank<r>.parquet)"
            );
        }
    }
    if files.len() as i64 != world {
        bail!(
            "--captured-losses {shown}: {} captures for world size {world}",
            files.len()
        );
    }
    Ok(files)
}

/// The Parquet files PATH names: a directory's, a rank file's siblings of the same run, or
/// the one file.
fn candidates(path: &Path) -> Result<Vec<PathBuf>> {
    let listed = |dir: &Path, keep: &dyn Fn(&Path) -> bool| -> Result<Vec<PathBuf>> {
        let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| anyhow!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| keep(p))
            .collect();
        all.sort();
        Ok(all)
    };
    if path.is_dir() {
        return listed(path, &|p| p.extension().is_some_and(|x| x == "parquet"));
    }
    if let Some((stem, _)) = rank_of_name(path) {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        return listed(dir, &|p| rank_of_name(p).is_some_and(|(s, _)| s == stem));
    }
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    bail!(
        "--captured-losses {}: no such file or directory",
        path.display()
    )
}

/// `run.rank3.parquet` → ("run", 3).
fn rank_of_name(path: &Path) -> Option<(String, i64)> {
    let name = path.file_name()?.to_str()?.strip_suffix(".parquet")?;
    let (stem, rank) = name.rsplit_once(".rank")?;
    Some((stem.to_string(), rank.parse().ok()?))
}

/// The report's model section where no model ran: the recorded losses' vocabulary only.
fn no_model(vocab: i64) -> ModelInfo {
    ModelInfo {
        path: String::new(),
        vocab_size: vocab,
        device: "none".to_string(),
        signature: String::new(),
        forward_args: vec![],
        forward_args_source: ArgsSource::Record,
        forward_args_note: "no model: the per-token losses the run recorded".to_string(),
        output: OutputForm::Tensor,
        dtype: String::new(),
        run_dtype: String::new(),
        tf32: false,
        cross_entropy: None,
        architecture: None,
        max_position_embeddings: None,
        consistency: Default::default(),
    }
}

/// The cross-rank findings: the ranks' counts, the formula's weights, the model's losses.
fn rank_findings(r: &RanksReport) -> Vec<Finding> {
    let mut findings = vec![];
    let other = r
        .steps
        .iter()
        .flat_map(|s| s.ranks.iter().map(move |k| (s, k)))
        .find(|(_, k)| k.counted == Some(CountKind::Other));
    if let Some((s, k)) = other {
        findings.push(Finding::new(
            Code::TrainerCountMismatch,
            Severity::Error,
            format!(
                "in step {} rank {}'s num_items_in_batch is {}: neither the step's trained targets over all {} ranks ({}) nor the rank's own ({}), so its loss is divided by the wrong count",
                s.step,
                k.rank,
                k.num_items.unwrap_or(f64::NAN),
                r.world_size,
                s.trained,
                k.trained
            ),
        ));
    }
    if let (Some(formula), Some(w)) = (r.formula, r.weights) {
        if r.misweights() {
            let fix = match formula {
                RankFormula::PerRankMeanAveraged => "divide by the step's count over every rank and multiply by the world size (transformers: average_tokens_across_devices=True)",
                RankFormula::DividedByWorldSize => "multiply the loss by the world size, which the ranks' gradient averaging divides by (as transformers does with average_tokens_across_devices)",
                _ => "normalise by the step's trained tokens over every rank",
            };
            findings.push(Finding::new(
                Code::AccumulationMisweighted,
                Severity::Error,
                format!(
                    "across {} ranks the trainer's loss is {}: in step {} one token weighs {:.2}× the global token mean's 1/N (total variation {:.3}){}; {fix}",
                    r.world_size,
                    formula.describe(),
                    w.worst_step,
                    w.max_relative_weight,
                    w.total_variation,
                    if (w.total_weight - 1.0).abs() > maskaudit_core::loss::steps::MISWEIGHT_TOLERANCE {
                        format!(", and the step's weights sum to {:.3} instead of 1: its gradient is {:.2}× the truth's", w.total_weight, w.total_weight)
                    } else {
                        String::new()
                    }
                ),
            ));
        }
    }
    if let Some(off) = r
        .cross_check
        .as_ref()
        .and_then(|c| c.first_off.map(|o| (c, o)))
    {
        let (c, o) = off;
        findings.push(Finding::new(
            Code::CapturedLossesMismatch,
            Severity::Error,
            format!(
                "the model's per-token losses differ from those the run recorded at {} of the positions of {} batches (beyond {CROSS_CHECK_RTOL:.0e} relative); first on rank {}, {}, position {}: {:.6} recorded, {:.6} from the model: the model is not the one that was trained, or not traced faithfully",
                c.positions_off,
                c.batches,
                o.rank,
                Pos { unit: Unit::Row, n: o.row }.named(),
                o.position,
                o.recorded,
                o.model
            ),
        ));
    }
    findings
}
