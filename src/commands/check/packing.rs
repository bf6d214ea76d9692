//! Packed rows in `check`: whether they run as they are (the model keeps documents apart) or
//! split into their documents (the batcher does that), the counts the report gives, and the
//! packing probe on the first packed batch (`model::consistency::packing_probe`).

use anyhow::Result;

use crate::data::batch::Batch;
use crate::findings::{Code, Finding, Severity};
use crate::model::consistency::packing_probe;
use crate::model::LoadedModel;
use crate::report::PackingSummary;

/// What the run's packed rows came to.
#[derive(Debug, Default)]
pub(super) struct Packing {
    /// Packed rows run as they are, with their own position ids.
    kept: u64,
    /// Packed rows split into their documents, and the documents.
    split_rows: u64,
    split_documents: u64,
    /// The probe's line, difference and tolerance, once run.
    probe: Option<(usize, f64, f64)>,
    probe_note: Option<String>,
}

impl Packing {
    /// Counts a batch's packed rows and, on the first with one run as it is, probes it.
    pub(super) fn observe(
        &mut self,
        model: &dyn LoadedModel,
        batch: &Batch,
        probe: bool,
    ) -> Result<()> {
        self.split_rows += batch.split_rows;
        self.split_documents += batch.split_documents;
        self.kept += batch.packed_rows.len() as u64;
        if !probe || batch.packed_rows.is_empty() || self.probe.is_some() {
            return Ok(());
        }
        if self.probe_note.is_some() {
            return Ok(());
        }
        let lengths = batch.row_lengths();
        let Some(&row) = batch
            .packed_rows
            .iter()
            .max_by_key(|&&r| (lengths[r], std::cmp::Reverse(r)))
        else {
            return Ok(());
        };
        let len = usize::try_from(lengths[row]).unwrap_or(0);
        let at = row * batch.seq_len;
        let ids = &batch.input_ids[at..at + len];
        let positions = &batch.position_ids[at..at + len];
        // Where the position does not go up by one: transformers' rule, the exporter's too.
        let starts: Vec<usize> = (1..len)
            .filter(|&i| positions[i] != positions[i - 1] + 1)
            .collect();
        match packing_probe(model, ids, positions, &starts)? {
            Some((difference, tolerance)) => {
                self.probe = Some((batch.lines[row], difference, tolerance));
            }
            None => {
                self.probe_note = Some("no document of two tokens in the first packed row".into())
            }
        }
        Ok(())
    }

    /// The report's `data.packing`, when any row was packed.
    /// Whether any packed row was split into its documents.
    pub(super) fn split(&self) -> bool {
        self.split_rows > 0
    }

    pub(super) fn summary(&self) -> Option<PackingSummary> {
        if self.kept == 0 && self.split_rows == 0 {
            return None;
        }
        Some(PackingSummary {
            packed_rows: self.kept + self.split_rows,
            split_rows: self.split_rows,
            split_documents: self.split_documents,
            probe_difference: self.probe.map(|p| p.1),
            probe_tolerance: self.probe.map(|p| p.2),
        })
    }

    pub(super) fn findings(&self) -> Vec<Finding> {
        let mut out = vec![];
        if self.split_rows > 0 {
            out.push(Finding::new(
                Code::PackedRowsSplit,
                Severity::Info,
                format!(
                    "packed rows were split into {} documents ({} packed rows), each run as its own row: the model cannot keep documents apart (it takes no position ids, or its record lists no packed layout); the losses are the per-document truth",
                    self.split_documents, self.split_rows
                ),
            ));
        }
        if let Some((line, difference, tolerance)) = self.probe {
            if difference.is_nan() || difference > tolerance {
                out.push(
                    Finding::new(
                        Code::ModelCrossesDocuments,
                        Severity::Error,
                        format!(
                            "the first packed batch's longest packed row gives per-token losses that differ from its documents run alone by {difference:.2e} (tolerance {tolerance:.0e}): the model lets a document attend to the ones before it, so every loss over packed rows is wrong; re-export the model with maskaudit-export (layout packed)"
                        ),
                    )
                    .with_records(vec![line]),
                );
            }
        }
        out
    }
}
