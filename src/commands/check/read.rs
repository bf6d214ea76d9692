//! The reading thread: rows read, linted and batched ahead of the model.

use std::sync::mpsc;
use std::thread;

use anyhow::Result;

use crate::data::batch::{Batch, Batcher};
use crate::data::{guard, FieldNames, RowSource};
use crate::lint::LintState;
use maskaudit_torch::loss::batch::check_vocabulary;

/// Batches the reading thread may have ready ahead of the model.
pub(super) const READ_AHEAD: usize = 2;

/// What the reading thread saw, once it is done.
pub(super) struct ReadSummary {
    pub(super) bytes_read: u64,
    /// The lint checks, fed every row on the reading thread; they count the rows and their
    /// mask sources too.
    pub(super) lint: LintState,
}

/// The reading thread's batches as the model side waits for them: a decoder call that stalls
/// on the reading thread arrives as an error ([`guard::recv_watched`]).
pub(super) struct Batches(mpsc::Receiver<Result<(Batch, u64)>>);

impl Iterator for Batches {
    type Item = Result<(Batch, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        guard::recv_watched(&self.0).unwrap_or_else(|line| Some(Err(anyhow::anyhow!(line))))
    }
}

/// Reads, validates and batches the rows on a thread of its own, up to [`READ_AHEAD`] batches
/// ahead of the model, so that parsing overlaps the forward pass. Batches arrive in file order,
/// each with the bytes read so far; the first error ends the stream, after the batches before
/// it, so errors surface in the same order as when reading inline. Memory stays bounded: the
/// channel holds at most `READ_AHEAD` batches.
pub(super) fn read_ahead(
    mut reader: RowSource,
    mut batcher: Batcher,
    lint: LintState,
    vocab: i64,
    fields: FieldNames,
) -> (Batches, thread::JoinHandle<ReadSummary>) {
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
    (Batches(rx), handle)
}

/// The next full batch, or the last partial one, or `None` at the end of the data.
pub(super) fn next_batch(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Unit;
    use crate::lint::LintOptions;

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
}
