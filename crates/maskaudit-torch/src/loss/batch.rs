//! A batch through the model: its ids checked against the vocabulary, uploaded to the model's
//! device, run through the forward, and its per-token losses computed. Shared by `check` and
//! the user-loss audit ([`crate::loss::user`]).

use std::borrow::Cow;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::data::batch::Batch;
use crate::data::{DataError, FieldNames, Pos, Row, Unit};
use crate::model::record::ExportRecord;
use crate::model::{self, LanguageModel, ModelError};
use crate::sys;

/// Token ids must be checked before they reach libtorch: an out-of-range id is an abort on
/// the CPU and poisons the whole CUDA context on a GPU (negative ones were refused by
/// [`crate::data::validate`]). The file's labels never reach libtorch (a user's loss gets
/// labels rebuilt from the ids and the mask), but one beyond the vocabulary means the file was
/// tokenized for another model, so they are checked too; negative ones are the lint checks'
/// business.
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
    /// Each row's position ids (`Batch::position_ids`).
    pub position_ids: Tensor,
}

impl BatchTensors {
    /// On a GPU the rows are copied into pinned (page-locked) host memory and uploaded with a
    /// non-blocking copy: queued behind the work already on the device, without the host
    /// waiting for that work to finish, as a copy from pageable memory makes it wait.
    /// libtorch's pinned-memory allocator keeps the host buffer until the copy has run.
    pub fn new(batch: &Batch, device: Device) -> Result<Self, tch::TchError> {
        Self::with_columns(batch, device, batch.seq_len, 0)
    }

    /// [`Self::new`] with every row extended to `columns` (at least the batch's `seq_len`):
    /// the columns past it are padding, id `pad_id`, attention 0, position ids continuing the
    /// row's count, as the batcher pads ([`gpu_columns`] says why).
    pub fn with_columns(
        batch: &Batch,
        device: Device,
        columns: usize,
        pad_id: i64,
    ) -> Result<Self, tch::TchError> {
        let t = batch.seq_len;
        let columns = columns.max(t);
        fn widen<'a>(
            v: &'a [i64],
            (rows, t, columns): (usize, usize, usize),
            fill: impl Fn(&[i64], usize) -> i64,
        ) -> Cow<'a, [i64]> {
            if columns == t {
                return Cow::Borrowed(v);
            }
            let mut out = Vec::with_capacity(rows * columns);
            for row in v.chunks(t.max(1)).take(rows) {
                out.extend_from_slice(row);
                out.extend((1..=columns - t).map(|k| fill(row, k)));
            }
            Cow::Owned(out)
        }
        let dims = (batch.rows, t, columns);
        let ids = widen(&batch.input_ids, dims, |_, _| pad_id);
        let mask = widen(&batch.attention_mask, dims, |_, _| 0);
        let positions = widen(&batch.position_ids, dims, |row, k| {
            row.last().copied().unwrap_or(-1) + k as i64
        });
        let shape = [batch.rows as i64, columns as i64];
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
            input_ids: upload(&ids)?,
            attention_mask: upload(&mask)?,
            position_ids: upload(&positions)?,
        })
    }

    /// The first `columns` of each row: views, no copy.
    pub fn narrow(&self, columns: usize) -> Result<Self, tch::TchError> {
        let view = |t: &Tensor| t.f_narrow(1, 0, columns as i64);
        Ok(Self {
            input_ids: view(&self.input_ids)?,
            attention_mask: view(&self.attention_mask)?,
            position_ids: view(&self.position_ids)?,
        })
    }
}

/// The columns `batch` runs with on a GPU: [`gpu_columns`] for a model with an exporter record,
/// whose export verified the trace on padded rows, never past its position limit. A file
/// without one could be anything, so its batches run as they are; so does a batch with a
/// position that sees no key (`Batch::every_position_sees_a_key`, within the record's sliding
/// window): its logits there would move with the appended columns.
pub fn rounded_columns(batch: &Batch, record: Option<&ExportRecord>) -> usize {
    let t = batch.seq_len;
    let Some(record) = record else {
        return t;
    };
    let size = |l: i64| usize::try_from(l).unwrap_or(0);
    if !batch.every_position_sees_a_key(record.sliding_window.map(size)) {
        return t;
    }
    gpu_columns(t, record.position_limit().map(size))
}

/// The columns a batch of `seq_len` tokens runs with on a GPU: `seq_len` rounded up to a
/// multiple of an eighth of the power of two below it (16 at least), never past `limit`.
///
/// Why: on a GPU, libtorch's cuDNN attention builds an execution plan for every new input shape,
/// about 75 ms on an H100, and batches of varying length are a new shape almost every time:
/// that doubled a Qwen2-0.5B-shaped model's forward (docs/performance.md, issue 22). Rounded
/// up, a dataset has at most eight shapes per doubling of length, for at most 1/8 more columns.
/// The columns appended are padding at the end of every row, which a causal model's earlier
/// positions do not see (what the consistency probe checks, "when padding columns were
/// appended"), and their losses are dropped.
pub fn gpu_columns(seq_len: usize, limit: Option<usize>) -> usize {
    let step = if seq_len <= 1 {
        16
    } else {
        let below = 1usize << (usize::BITS - 1 - seq_len.leading_zeros());
        (below / 8).max(16)
    };
    let rounded = seq_len.div_ceil(step).saturating_mul(step);
    match limit {
        Some(limit) => rounded.min(limit).max(seq_len),
        None => rounded,
    }
}

/// Runs one batch through the model and returns its per-token losses `[B, T-1]` as a host
/// vector. Also the building block of the user-loss audit.
pub fn batch_losses<M: LanguageModel + ?Sized>(
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
        .logits_at(
            &tensors.input_ids,
            &tensors.attention_mask,
            &tensors.position_ids,
        )
        .map_err(|e| e.at_batch(&path, first_line))?;
    let in_batch = |e: tch::TchError| ModelError::in_batch(&path, first_line, &e);
    let losses = token_losses(&logits, &tensors.input_ids, &path, first_line)?;
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

/// The per-token losses of the batch starting at `line` ([`crate::loss::token_losses`]), a
/// libtorch error or a non-finite logit an error naming the batch.
pub fn token_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    path: &str,
    line: usize,
) -> Result<Tensor, ModelError> {
    crate::loss::token_losses(logits, input_ids, crate::loss::CHUNK_ELEMENTS)
        .map_err(|e| ModelError::in_batch(path, line, &e))?
        .ok_or(ModelError::NonFinite {
            path: path.to_string(),
            line,
        })
}

/// A lower bound on what the forward of a batch allocates: its logits counted as float32, 4
/// bytes an element (a half-precision forward's own logits and their float32 copy for the
/// cross-entropy come to more). A batch that cannot fit is refused before the forward, with
/// the option that fixes it, rather than killed by the kernel halfway.
/// Only on the CPU: MemAvailable says nothing about a GPU.
fn check_memory<M: LanguageModel + ?Sized>(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::Batcher;

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
    fn gpu_columns_round_up_by_an_eighth_of_the_power_of_two_below() {
        let cases = [
            (0, None, 0),
            (1, None, 16),
            (2, None, 16),
            (16, None, 16),
            (17, None, 32),
            (200, None, 208),
            (1024, None, 1024),
            (1025, None, 1152),
            (1934, None, 2048),
            (2048, None, 2048),
            (2049, None, 2304),
            (1934, Some(2000), 2000),
            (1934, Some(1934), 1934),
            // A limit below the batch is the length check's business: never fewer columns.
            (1934, Some(1000), 1934),
        ];
        for (len, limit, want) in cases {
            assert_eq!(gpu_columns(len, limit), want, "{len} {limit:?}");
        }
        // At most eight shapes per doubling, each at most an eighth longer than its batch.
        let shapes: std::collections::BTreeSet<usize> =
            (1025..=2048).map(|t| gpu_columns(t, None)).collect();
        assert_eq!(shapes.len(), 8);
        assert!((2..5000).all(|t| gpu_columns(t, None) * 8 <= t * 9 + 16 * 8));
    }

    #[test]
    fn appended_columns_are_padding_continuing_each_row() {
        let mut batcher = Batcher::new(2, Some(5), "d.jsonl");
        assert!(batcher.push(Row::new(1, vec![7, 8, 9])).unwrap().is_none());
        let batch = batcher
            .push(Row::new(2, vec![4]))
            .unwrap()
            .expect("a batch of two rows");
        let t = BatchTensors::with_columns(&batch, Device::Cpu, 5, 3).unwrap();
        let rows = |x: &Tensor| Vec::<Vec<i64>>::try_from(x).unwrap();
        assert_eq!(rows(&t.input_ids), [[7, 8, 9, 3, 3], [4, 5, 5, 3, 3]]);
        assert_eq!(rows(&t.attention_mask), [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]);
        assert_eq!(rows(&t.position_ids), [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]);
        let plain = BatchTensors::new(&batch, Device::Cpu).unwrap();
        let narrowed = t.narrow(3).unwrap();
        assert!(narrowed.input_ids.equal(&plain.input_ids));
        assert!(narrowed.attention_mask.equal(&plain.attention_mask));
        assert!(narrowed.position_ids.equal(&plain.position_ids));
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
