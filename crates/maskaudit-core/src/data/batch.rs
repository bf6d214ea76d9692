//! Grouping rows into right-padded batches, in file order.
//!
//! Each row's position ids come with it (`data::documents`: its own, or restarting at each
//! packed document). For a model that cannot keep a packed row's documents apart, the batcher
//! splits such rows into one row per document ([`Batcher::with_split`]), and counts them.
//!
//! Pure code: no tensors. A batch is `rows × seq_len` with every row padded to the longest
//! row of the batch; padding added here gets mask 0 and attention 0. Each position is also
//! classified as padding or not by [`PaddingRule`] (`data::padding`), the one definition
//! `lint` uses too; that classification is for counting and reporting, and leaves the
//! attention mask the model gets as the row gave it.
#![warn(clippy::arithmetic_side_effects)]

use crate::data::{documents, PaddingRule, Pos, Row, Unit};

/// A padded batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    /// 1 for tokens of the row, 0 where the row's attention mask is 0 and for the padding
    /// added here; what the model is given.
    pub attention_mask: Vec<i64>,
    /// Aligned with `input_ids`: 1 where the token is a training target.
    pub mask: Vec<u8>,
    /// Aligned with `input_ids`: 1 where the token is padding ([`PaddingRule`]: the row's own
    /// padding, left padding included, and what was appended here).
    pub padding: Vec<u8>,
    /// Aligned with `input_ids`: the position ids a forward taking them gets
    /// ([`documents::positions`]); appended padding continues its row's count.
    pub position_ids: Vec<i64>,
    /// Line number of each row.
    pub lines: Vec<usize>,
    /// Indices of the rows that are packed (several documents), as run.
    pub packed_rows: Vec<usize>,
    /// Packed rows split into their documents ([`Batcher::with_split`]), and the documents.
    pub split_rows: u64,
    pub split_documents: u64,
}

/// How a batch's next-token targets divide: each is padding or a real token, trained or not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TargetCounts {
    /// Every next-token position (N).
    pub positions: u64,
    /// Trained targets (Σm), padding included.
    pub trained: u64,
    /// Targets that are padding, trained or not.
    pub padding: u64,
    /// Of those, trained (the mask trains padding).
    pub padding_trained: u64,
    /// Real (non-padding) targets left untrained: prompts, masked turns.
    pub untrained_real: u64,
}

impl TargetCounts {
    /// Counts aligned target and padding masks (1 = trained, 1 = padding).
    pub fn of(mask: &[u8], padding: &[u8]) -> Self {
        let mut c = TargetCounts::default();
        for (&m, &p) in mask.iter().zip(padding) {
            let (trained, pad) = (m != 0, p != 0);
            c.positions = c.positions.saturating_add(1);
            c.trained = c.trained.saturating_add(u64::from(trained));
            c.padding = c.padding.saturating_add(u64::from(pad));
            c.padding_trained = c.padding_trained.saturating_add(u64::from(pad && trained));
            c.untrained_real = c.untrained_real.saturating_add(u64::from(!pad && !trained));
        }
        c
    }

    /// Adds another batch's counts; saturating, so a count never wraps.
    pub fn add(&mut self, other: &TargetCounts) {
        self.positions = self.positions.saturating_add(other.positions);
        self.trained = self.trained.saturating_add(other.trained);
        self.padding = self.padding.saturating_add(other.padding);
        self.padding_trained = self.padding_trained.saturating_add(other.padding_trained);
        self.untrained_real = self.untrained_real.saturating_add(other.untrained_real);
    }
}

impl Batch {
    /// Number of next-token positions: position t predicts token t+1.
    pub fn positions(&self) -> usize {
        self.rows.saturating_mul(self.seq_len.saturating_sub(1))
    }

    /// The mask aligned with the targets: `m[b,t] = mask[b,t+1]`, shape `rows × (seq_len-1)`.
    pub fn target_mask(&self) -> Vec<u8> {
        self.shifted_mask(1)
    }

    /// Next-token positions whose target is padding: what a loss that does not mask takes in
    /// besides the untrained real tokens (prompts).
    pub fn padding_targets(&self) -> usize {
        self.padding_target_mask()
            .iter()
            .filter(|&&p| p != 0)
            .count()
    }

    /// 1 where the target (token t+1) is padding, `rows × (seq_len-1)` like the target mask.
    pub fn padding_target_mask(&self) -> Vec<u8> {
        shifted(&self.padding, self.rows, self.seq_len, 1)
    }

    /// How the batch's targets divide into padding and real tokens, trained or not.
    pub fn target_counts(&self) -> TargetCounts {
        TargetCounts::of(&self.target_mask(), &self.padding_target_mask())
    }

    /// Each row's length up to and including its last real token (attention 1).
    pub fn row_lengths(&self) -> Vec<i64> {
        self.attention_mask
            .chunks(self.seq_len.max(1))
            .take(self.rows)
            .map(|row| {
                row.iter().rposition(|&a| a != 0).map_or(0, |i| {
                    i64::try_from(i).unwrap_or(i64::MAX).saturating_add(1)
                })
            })
            .collect()
    }

    /// [`Self::row_lengths`] with packed rows' as 0: the trace-consistency probe runs rows
    /// with positions 0, 1, …, which a packed row run with its own does not have (the packing
    /// probe checks those).
    pub fn probe_lengths(&self) -> Vec<i64> {
        let mut lengths = self.row_lengths();
        for &r in &self.packed_rows {
            if let Some(l) = lengths.get_mut(r) {
                *l = 0;
            }
        }
        lengths
    }

    /// Whether every position of every row sees a key the model attends to: itself, or an
    /// earlier attended token of its document (a document starts wherever the position ids do
    /// not go up by one, the exporter's rule), within `window` positions for a model with a
    /// sliding window. A position that sees none (left padding; padding further past its row's
    /// last token than the window reaches) gets its attention spread over every column under an
    /// additive mask, future ones included, so its logits depend on the batch's length: such a
    /// batch is not rounded up to fewer shapes on a GPU.
    pub fn every_position_sees_a_key(&self, window: Option<usize>) -> bool {
        let t = self.seq_len.max(1);
        let rows = self
            .attention_mask
            .chunks(t)
            .zip(self.position_ids.chunks(t));
        rows.take(self.rows).all(|(mask, positions)| {
            let mut last: Option<usize> = None;
            let mut previous: Option<i64> = None;
            for (q, (&m, &p)) in mask.iter().zip(positions).enumerate() {
                if previous.is_some_and(|prev| p != prev.saturating_add(1)) {
                    last = None;
                }
                previous = Some(p);
                if m != 0 {
                    last = Some(q);
                }
                let seen = last.is_some_and(|l| window.is_none_or(|w| q.saturating_sub(l) < w));
                if !seen {
                    return false;
                }
            }
            true
        })
    }

    /// `m[b,t] = mask[b,t+shift]`, shape `rows × (seq_len-shift)`.
    pub fn shifted_mask(&self, shift: usize) -> Vec<u8> {
        shifted(&self.mask, self.rows, self.seq_len, shift)
    }
}

/// `x[b,t+shift]` of a `rows × seq_len` array, shape `rows × (seq_len-shift)`.
fn shifted(values: &[u8], rows: usize, seq_len: usize, shift: usize) -> Vec<u8> {
    let shift = shift.min(seq_len);
    let mut out = Vec::with_capacity(rows.saturating_mul(seq_len.saturating_sub(shift)));
    for row in values.chunks(seq_len.max(1)).take(rows) {
        out.extend_from_slice(row.get(shift..).unwrap_or_default());
    }
    out
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
    /// The rows of each batch to come, in order, when they are given ([`Batcher::with_sizes`]);
    /// `batch_size` once they run out.
    sizes: std::collections::VecDeque<usize>,
    rule: PaddingRule,
    path: String,
    unit: Unit,
    split: bool,
    pending: Vec<Row>,
}

impl Batcher {
    pub fn new(batch_size: usize, pad_id: Option<i64>, path: impl Into<String>) -> Self {
        assert!(batch_size > 0, "batch size is validated by the CLI");
        Self {
            batch_size,
            sizes: Default::default(),
            rule: PaddingRule::new(pad_id, None),
            path: path.into(),
            unit: Unit::Line,
            split: false,
            // Grown as rows arrive: the option is a bound, not a size to reserve.
            pending: Vec::new(),
        }
    }

    /// What the rows' record numbers count, for messages (lines unless told).
    pub fn with_unit(mut self, unit: Unit) -> Self {
        self.unit = unit;
        self
    }

    /// The EOS id (`--eos-id`), which padding by pad id needs when the two are the same.
    pub fn with_eos_id(mut self, eos_id: Option<i64>) -> Self {
        self.rule.eos_id = eos_id;
        self
    }

    /// Split packed rows into one row per document: for a model that would let a document
    /// attend to the ones before it.
    pub fn with_split(mut self, split: bool) -> Self {
        self.split = split;
        self
    }

    /// Batches of these many rows, in order (a captured run's micro-batches), instead of
    /// `batch_size` each; a size of 0 counts as 1.
    pub fn with_sizes(mut self, sizes: Vec<usize>) -> Self {
        self.sizes = sizes.into_iter().map(|n| n.max(1)).collect();
        self
    }

    /// Adds a row; returns a batch once the batch's rows are pending.
    pub fn push(&mut self, row: Row) -> Result<Option<Batch>, BatchError> {
        self.pending.push(row);
        let size = self.sizes.front().copied().unwrap_or(self.batch_size);
        if self.pending.len() >= size {
            self.sizes.pop_front();
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
        if self.split {
            return split_rows(&rows, self.rule, &self.path, self.unit);
        }
        pad_rows(&rows, self.rule, &self.path, self.unit)
    }
}

/// [`pad_rows`] after splitting every packed row into its documents; rows that are ragged
/// only because of the split are padded with the pad id, or 0 without one (attention 0).
pub fn split_rows(
    rows: &[Row],
    rule: PaddingRule,
    path: &str,
    unit: Unit,
) -> Result<Batch, BatchError> {
    // Rows of different lengths still need a pad id, as without the split.
    let longest = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    if rule.pad_id.is_none() {
        if let Some(short) = rows.iter().find(|r| r.input_ids.len() != longest) {
            let long = rows.iter().find(|r| r.input_ids.len() == longest);
            return Err(BatchError::NeedsPadId {
                path: path.to_string(),
                at: Pos {
                    unit,
                    n: short.line,
                },
                len: short.input_ids.len(),
                other_at: Pos {
                    unit,
                    n: long.map_or(0, |r| r.line),
                },
                other_len: longest,
            });
        }
    }
    let (mut split, mut documents) = (0u64, 0u64);
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let starts = documents::starts(row, rule.of_row(row));
        if documents::is_packed(row, &starts) {
            let parts = documents::split(row, &starts);
            split = split.saturating_add(1);
            documents = documents.saturating_add(parts.len() as u64);
            out.extend(parts);
        } else {
            out.push(row.clone());
        }
    }
    // The fill id only: padding is still told by the rule as given.
    let mut batch = pad_rows_filled(&out, rule, Some(rule.pad_id.unwrap_or(0)), path, unit)?;
    batch.split_rows = split;
    batch.split_documents = documents;
    Ok(batch)
}

/// Right-pads rows to the longest one, with `rule.pad_id` (0 when rows are all as long).
pub fn pad_rows(
    rows: &[Row],
    rule: PaddingRule,
    path: &str,
    unit: Unit,
) -> Result<Batch, BatchError> {
    pad_rows_filled(rows, rule, rule.pad_id, path, unit)
}

/// [`pad_rows`] appending `fill` (the pad id, or 0 for split rows without one).
fn pad_rows_filled(
    rows: &[Row],
    rule: PaddingRule,
    fill_id: Option<i64>,
    path: &str,
    unit: Unit,
) -> Result<Batch, BatchError> {
    let seq_len = rows.iter().map(|r| r.input_ids.len()).max().unwrap_or(0);
    let pad = match fill_id {
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
    let n = rows.len().saturating_mul(seq_len);
    let mut batch = Batch {
        rows: rows.len(),
        seq_len,
        input_ids: Vec::with_capacity(n),
        attention_mask: Vec::with_capacity(n),
        mask: Vec::with_capacity(n),
        padding: Vec::with_capacity(n),
        position_ids: Vec::with_capacity(n),
        lines: rows.iter().map(|r| r.line).collect(),
        packed_rows: Vec::new(),
        split_rows: 0,
        split_documents: 0,
    };
    for (index, row) in rows.iter().enumerate() {
        let len = row.input_ids.len();
        let fill = seq_len.saturating_sub(len);
        batch.input_ids.extend_from_slice(&row.input_ids);
        batch.input_ids.extend(std::iter::repeat_n(pad, fill));
        batch
            .attention_mask
            .extend(row.attention_mask.iter().map(|&a| i64::from(a)));
        batch.attention_mask.extend(std::iter::repeat_n(0, fill));
        batch.mask.extend_from_slice(&row.mask);
        batch.mask.extend(std::iter::repeat_n(0, fill));
        let span = rule.of_row(row);
        let starts = documents::starts(row, span);
        if documents::is_packed(row, &starts) {
            batch.packed_rows.push(index);
        }
        let positions = documents::positions(row, &starts);
        let next = positions.last().map_or(0, |&p| p.saturating_add(1));
        batch.position_ids.extend_from_slice(&positions);
        batch
            .position_ids
            .extend((0..fill).map(|i| next.saturating_add(i as i64)));
        batch
            .padding
            .extend((0..len).map(|i| u8::from(span.contains(i))));
        batch.padding.extend(std::iter::repeat_n(1, fill));
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
    fn a_position_that_sees_no_key_is_found() {
        let fields = crate::data::FieldNames::default();
        let parse = |json: &str| crate::data::parse_row(json, "d", 1, &fields).unwrap();
        let batch = |rows: &[Row]| {
            pad_rows(rows, PaddingRule::new(Some(0), None), "d", Unit::Line).unwrap()
        };
        // Right padding sees the row's tokens; without a window, however far.
        let right = batch(&[row(1, &[4, 5, 6, 7, 8, 9]), row(2, &[7])]);
        assert!(right.every_position_sees_a_key(None));
        assert!(right.every_position_sees_a_key(Some(6)));
        // With a window of 3, the shorter row's padding 3 and more past its token sees none.
        assert!(!right.every_position_sees_a_key(Some(3)));
        // Left padding sees nothing before the first token.
        let left = batch(&[parse(
            r#"{"input_ids":[0,0,5,6],"attention_mask":[0,0,1,1]}"#,
        )]);
        assert!(!left.every_position_sees_a_key(None));
        // A packed row: each document's first token sees itself; a masked one would not.
        let packed = batch(&[parse(
            r#"{"input_ids":[1,2,3,4,5],"position_ids":[0,1,0,1,2]}"#,
        )]);
        assert!(packed.every_position_sees_a_key(None));
        let masked = batch(&[parse(
            r#"{"input_ids":[1,2,3,4,5],"position_ids":[0,1,0,1,2],"attention_mask":[1,1,0,1,1]}"#,
        )]);
        assert!(!masked.every_position_sees_a_key(None));
    }

    #[test]
    fn pads_to_longest_row_with_mask_zero() {
        let b = pad_rows(
            &[row(1, &[4, 5, 6]), row(2, &[7])],
            PaddingRule::new(Some(0), None),
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
    fn padding_is_the_rows_own_and_the_appended() {
        let fields = crate::data::FieldNames::default();
        let parse = |json: &str, line| crate::data::parse_row(json, "d", line, &fields).unwrap();
        let rows = [
            // pad == eos: the first 2 of the run is the EOS, trained; the rest is padding.
            parse(r#"{"input_ids":[1,5,2,2,2],"labels":[1,5,2,2,-100]}"#, 1),
            // Left padding by attention mask.
            parse(
                r#"{"input_ids":[2,7,8,2],"attention_mask":[0,1,1,1],"labels":[-100,-100,8,2]}"#,
                2,
            ),
        ];
        let b = pad_rows(&rows, PaddingRule::new(Some(2), Some(2)), "d", Unit::Line).unwrap();
        assert_eq!(b.padding, vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 1]);
        // The model's attention mask is the rows' own, plus the appended column.
        assert_eq!(b.attention_mask, vec![1, 1, 1, 1, 1, 0, 1, 1, 1, 0]);
        assert_eq!(b.padding_target_mask(), vec![0, 0, 1, 1, 0, 0, 0, 1]);
        assert_eq!(b.padding_targets(), 3);
        assert_eq!(
            b.target_counts(),
            TargetCounts {
                positions: 8,
                trained: 5,
                padding: 3,
                padding_trained: 1,
                untrained_real: 1,
            }
        );
    }

    #[test]
    fn ragged_rows_without_pad_id_name_the_option() {
        let rows = [row(1, &[4, 5, 6]), row(2, &[7])];
        let err = pad_rows(&rows, PaddingRule::default(), "d.jsonl", Unit::Line).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("d.jsonl:2: input_ids: row has 1 tokens but the row at line 1 has 3"),
            "{msg}"
        );
        assert!(msg.contains("--pad-id"), "{msg}");
        let msg = pad_rows(&rows, PaddingRule::default(), "d.parquet", Unit::Row)
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with("d.parquet:row 2: input_ids: row has 1 tokens but the row at row 1"),
            "{msg}"
        );
        // Equal lengths need no pad id.
        assert!(pad_rows(
            &[row(1, &[1, 2]), row(2, &[3, 4])],
            PaddingRule::default(),
            "d",
            Unit::Line
        )
        .is_ok());
    }

    #[test]
    fn given_sizes_set_each_batch_then_the_batch_size_takes_over() {
        let mut batcher = Batcher::new(2, Some(0), "d").with_sizes(vec![1, 3]);
        let mut sizes = vec![];
        for line in 1..=7 {
            if let Some(b) = batcher.push(row(line, &[5, 6])).unwrap() {
                sizes.push(b.rows);
            }
        }
        sizes.extend(batcher.finish().unwrap().map(|b| b.rows));
        assert_eq!(sizes, vec![1, 3, 2, 1]);
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
