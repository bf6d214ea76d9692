//! `maskaudit check`: stream the dataset through the model and aggregate the per-token losses.
//!
//! The dataset is read one row at a time and processed one batch at a time, so memory does
//! not grow with the number of rows.

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
use crate::model::{self, device_name, DeviceChoice, LanguageModel, ModelError, TorchScriptLm};
use crate::report::{DataSummary, ModelInfo, Report, Verdict, SCHEMA_VERSION};
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
    pub rtol: f64,
    pub probes: bool,
}

pub fn run(opts: &CheckOptions, progress: &ProgressBar) -> Result<Report> {
    model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();

    let device = opts.device.resolve()?;
    let model = TorchScriptLm::load(&opts.model, device)?;
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
            Some(LossAudit::new(
                loss,
                l.rtol,
                l.probes,
                opts.pad_id.unwrap_or(0),
            ))
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
    for item in batches {
        let (batch, bytes_read) = item?;
        process_batch(&model, &batch, &mut totals, audit.as_mut(), &opts.model)?;
        progress.set_position(bytes_read);
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
    let user_loss = audit.map(|audit| {
        let sequence_gap = losses
            .sequence_mean
            .zip(losses.masked_token_mean)
            .map(|(s, m)| relative_difference(s, m));
        let (report, loss_findings) = audit.finish(sequence_gap);
        findings.extend(loss_findings);
        report
    });
    opts.overrides.apply(&mut findings);
    let verdict = Verdict::of(&findings);

    Ok(Report {
        schema_version: SCHEMA_VERSION,
        model: ModelInfo {
            path: model::path_string(&opts.model),
            vocab_size: vocab,
            device: device_name(device),
            signature: model.signature(),
            output: model.output_form(),
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
            mask_source: statistics.mask_source.clone(),
        },
        statistics,
        losses,
        contamination,
        user_loss,
        findings,
        verdict,
    })
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
pub struct BatchTensors {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

impl BatchTensors {
    pub fn new(batch: &Batch, device: Device) -> Result<Self, tch::TchError> {
        let shape = [batch.rows as i64, batch.seq_len as i64];
        let upload = |v: &[i64]| -> Result<Tensor, tch::TchError> {
            Tensor::f_from_slice(v)?.f_view(shape)?.f_to_device(device)
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
) -> Result<(BatchTensors, Tensor, Vec<f32>)> {
    let path = model::path_string(model_path);
    let first_line = batch.lines.first().copied().unwrap_or(0);
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
    let losses = model::token_losses(&logits, &tensors.input_ids, model::CHUNK_ELEMENTS)
        .map_err(ModelError::from)?
        .ok_or(ModelError::NonFinite {
            path,
            line: first_line,
        })?;
    let host: Vec<f32> = Vec::try_from(
        losses
            .f_to_device(Device::Cpu)
            .and_then(|t| t.f_to_kind(Kind::Float))
            .and_then(|t| t.f_flatten(0, -1))
            .map_err(ModelError::from)?,
    )
    .context("copying per-token losses to the host")?;
    Ok((tensors, logits, host))
}

fn process_batch(
    model: &TorchScriptLm,
    batch: &Batch,
    totals: &mut LossTotals,
    audit: Option<&mut LossAudit>,
    model_path: &std::path::Path,
) -> Result<()> {
    if batch.seq_len < 2 {
        // One-token rows have no next-token position: nothing to run.
        totals.add_batch(&[], &[], batch.rows);
        return Ok(());
    }
    let (tensors, logits, losses) = batch_losses(model, batch, model_path)?;
    let target_mask = batch.target_mask();
    let sums = totals.add_batch(&losses, &target_mask, batch.rows);
    if let Some(audit) = audit {
        audit.observe(model, batch, &tensors, &logits, &sums)?;
    }
    Ok(())
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
