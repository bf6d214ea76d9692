//! Grouping rows into right-padded batches, in file order.
//!
//! Pure code: no tensors. A batch is `rows × seq_len` with every row padded to the longest
//! row of the batch; padding added here gets mask 0 and attention 0.

use crate::data::{Pos, Row, Unit};

/// A padded batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    /// 1 for tokens of the row, 0 for padding (added here or already in the file).
    pub attention_mask: Vec<i64>,
    /// Aligned with `input_ids`: 1 where the token is a training target.
    pub mask: Vec<u8>,
    /// Line number of each row.
    pub lines: Vec<usize>,
}

impl Batch {
    /// Number of next-token positions: position t predicts token t+1.
    pub fn positions(&self) -> usize {
        self.rows * self.seq_len.saturating_sub(1)
    }

    /// The mask aligned with the targets: `m[b,t] = mask[b,t+1]`, shape `rows × (seq_len-1)`.
    pub fn target_mask(&self) -> Vec<u8> {
        self.shifted_mask(1)
    }

    /// Next-token positions whose target is padding (attention 0): what a loss that does not
    /// mask takes in besides the untrained real tokens (prompts).
    pub fn padding_targets(&self) -> usize {
        let t = self.seq_len;
        (0..self.rows)
            .map(|b| {
                self.attention_mask[b * t + 1.min(t)..(b + 1) * t]
                    .iter()
                    .filter(|&&a| a == 0)
                    .count()
            })
            .sum()
    }

    /// 1 where the target (token t+1) is padding, `rows × (seq_len-1)` like the target mask.
    pub fn padding_target_mask(&self) -> Vec<u8> {
        let t = self.seq_len;
        let mut out = Vec::with_capacity(self.positions());
        for b in 0..self.rows {
            out.extend(
                self.attention_mask[b * t + 1.min(t)..(b + 1) * t]
                    .iter()
                    .map(|&a| u8::from(a == 0)),
            );
        }
        out
    }

    /// Each row's length up to and including its last real token (attention 1).
    pub fn row_lengths(&self) -> Vec<i64> {
        let t = self.seq_len;
        (0..self.rows)
            .map(|b| {
                let row = &self.attention_mask[b * t..(b + 1) * t];
                row.iter()
                    .rposition(|&a| a != 0)
                    .map_or(0, |i| i as i64 + 1)
            })
            .collect()
    }

    /// `m[b,t] = mask[b,t+shift]`, shape `rows × (seq_len-shift)`.
    pub fn shifted_mask(&self, shift: usize) -> Vec<u8> {
        let t = self.seq_len;
        let shift = shift.min(t);
        let mut out = Vec::with_capacity(self.rows * (t - shift));
        for b in 0..self.rows {
            out.extend_from_slice(&self.mask[b * t + shift..(b + 1) * t]);
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum BatchError {
    #[error(
        "{path}:{at}: input_ids: row has {len} tokens but the row at {other} has \
         {other_len}; pass --pad-id to pad rows of different lengths",
        other = .other_at.named()
    )]
    NeedsPadId {
        path: String,
        at: Pos,
        len: usize,
        other_at: Pos,
        other_len: usize,
    },
}

/// Collects rows and emits a padded batch every `batch_size` rows.
pub struct Batcher {
    batch_size: usize,
    pad_id: Option<i64>,
    path: String,
    unit: Unit,
    pending: Vec<Row>,
}

impl Batcher {
    pub fn new(batch_size: usize, pad_id: Option<i64>, path: impl Into<String>) -> Self {
        assert!(batch_size > 0, "batch size is validated by the CLI");
        Self {
            batch_size,
            pad_id,
            path: path.into(),
            unit: Unit::Line,
            // Grown as rows arrive: the option is a bound, not a size to reserve.
            pending: Vec::new(),
        }
    }

    /// What the rows' record numbers count, for messages (lines unless told).
    pub fn with_unit(mut self, unit: Unit) -> Self {
        self.unit = unit;
        self
    }

    /// Adds a row; returns a batch once `batch_size` rows are pending.
    pub fn push(&mut self, row: Row) -> Result<Option<Batch>, BatchError> {
        self.pending.push(row);
        if self.pending.len() == self.batch_size {
            self.flush().map(Some)
        } else {
            Ok(None)
        }
    }

    /// The last, possibly partial, batch.
    pub fn finish(&mut self) -> Result<Option<Batch>, BatchError> {
        if self.pending.is_empty() {
            Ok(None)
        } else {
            self.flush().map(Some)
        }
    }

    fn flush(&mut self) -> Result<Batch, BatchError> {
        let rows = std::mem::take(&mut self.pending);
        pad_rows(&rows, self.pad_id, &self.path, self.unit)
    }
}

/// Right-pads rows to the longest one.
pub fn pad_rows(
    rows: &[Row],
    pad_id: Option<i64>,
    path: &str,
    unit: Unit,
) -> Result<Batch, BatchError> {
    let seq_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let pad = match pad_id {
        Some(p) => p,
        None => {
            let longest = rows.iter().find(|r| r.input_ids.len() == seq_len);
            if let (Some(short), Some(long)) =
                (rows.iter().find(|r| r.input_ids.len() != seq_len), longest)
            {
                return Err(BatchError::NeedsPadId {
                    path: path.to_string(),
                    at: Pos {
                        unit,
                        n: short.line,
                    },
                    len: short.input_ids.len(),
                    other_at: Pos { unit, n: long.line },
                    other_len: seq_len,
                });
            }
            0
        }
    };
    let n = rows.len() * seq_len;
    let mut batch = Batch {
        rows: rows.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        attention_mask: Vec::with_capacity(n),
        mask: Vec::with_capacity(n),
        lines: rows.iter().map(|r| r.line).collect(),
    };
    for row in rows {
        let fill = seq_len - row.input_ids.len();
        batch.input_ids.extend_from_slice(&row.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad, fill));
        batch
            .attention_mask
            .extend(row.attention_mask.iter().map(|&a| i64::from(a)));
        batch.attention_mask.extend(std::iter::repeat_n(0, fill));
        batch.mask.extend_from_slice(&row.mask);
        batch.mask.extend(std::iter::repeat_n(0, fill));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: usize, ids: &[i64]) -> Row {
        Row::new(line, ids.to_vec())
    }

    #[test]
    fn pads_to_longest_row_with_mask_zero() {
        let b = pad_rows(
            &[row(1, &[4, 5, 6]), row(2, &[7])],
            Some(0),
            "d",
            Unit::Line,
        )
        .unwrap();
        assert_eq!((b.rows, b.seq_len), (2, 3));
        assert_eq!(b.input_ids, vec![4, 5, 6, 7, 0, 0]);
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(b.mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(b.target_mask(), vec![1, 1, 0, 0]);
        assert_eq!(b.shifted_mask(0), b.mask);
        assert_eq!(b.shifted_mask(2), vec![1, 0]);
        assert_eq!(b.positions(), 4);
    }

    #[test]
    fn ragged_rows_without_pad_id_name_the_option() {
        let rows = [row(1, &[4, 5, 6]), row(2, &[7])];
        let err = pad_rows(&rows, None, "d.jsonl", Unit::Line).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("d.jsonl:2: input_ids: row has 1 tokens but the row at line 1 has 3"),
            "{msg}"
        );
        assert!(msg.contains("--pad-id"), "{msg}");
        let msg = pad_rows(&rows, None, "d.parquet", Unit::Row)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("d.parquet:row 2: input_ids: row has 1 tokens but the row at row 1"),
            "{msg}"
        );
        // Equal lengths need no pad id.
        assert!(pad_rows(&[row(1, &[1, 2]), row(2, &[3, 4])], None, "d", Unit::Line).is_ok());
    }

    #[test]
    fn batcher_emits_full_then_partial_batches() {
        let mut batcher = Batcher::new(2, Some(0), "d");
        let mut sizes = vec![];
        for i in 0..5 {
            if let Some(b) = batcher.push(row(i + 1, &[1, 2])).unwrap() {
                sizes.push(b.rows);
            }
        }
        sizes.push(batcher.finish().unwrap().unwrap().rows);
        assert_eq!(sizes, vec![2, 2, 1]);
        assert!(batcher.finish().unwrap().is_none());
    }
}
