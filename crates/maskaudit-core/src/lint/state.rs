//! The streaming accumulator: every row through every check, then the statistics and the
//! findings. Counters saturate rather than wrap.
#![warn(clippy::arithmetic_side_effects)]

use crate::data::Row;
use crate::findings::Finding;
use crate::lint::checks::{
    ratio, Alignment, Batching, Disagreement, Eos, MaskSources, NegativeLabels, Packing, Padding,
    RowFacts, Supervision,
};
use crate::lint::stats::LengthHistogram;
use crate::lint::targets::padding;
use crate::lint::{EosStats, LintOptions, LintStats};

/// The streaming accumulator.
#[derive(Debug, Clone)]
pub struct LintState {
    opts: LintOptions,
    rows: u64,
    tokens: u64,
    lengths: LengthHistogram,
    content_lengths: LengthHistogram,
    supervision: Supervision,
    padding: Padding,
    eos: Eos,
    disagreement: Disagreement,
    packing: Packing,
    alignment: Alignment,
    negative: NegativeLabels,
    sources: MaskSources,
    batching: Batching,
}

impl LintState {
    pub fn new(opts: LintOptions) -> Self {
        Self {
            opts,
            rows: 0,
            tokens: 0,
            lengths: LengthHistogram::default(),
            content_lengths: LengthHistogram::default(),
            supervision: Supervision::default(),
            padding: Padding::default(),
            eos: Eos::default(),
            disagreement: Disagreement::default(),
            packing: Packing::default(),
            alignment: Alignment::default(),
            negative: NegativeLabels::default(),
            sources: MaskSources::default(),
            batching: Batching::default(),
        }
    }

    pub fn options(&self) -> &LintOptions {
        &self.opts
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Takes one validated row into every check.
    pub fn observe(&mut self, row: &Row) {
        let len = row.input_ids.len();
        let facts = RowFacts {
            row,
            len,
            padding: padding(row, self.opts.pad_id, self.opts.eos_id),
            shifted: self.opts.shifted,
        };
        self.rows = self.rows.saturating_add(1);
        self.tokens = self.tokens.saturating_add(len as u64);
        self.lengths.add(len);
        self.content_lengths.add(facts.padding.content_len());
        if let Some(batch_size) = self.opts.batch_size {
            self.batching.observe(len, batch_size);
        }
        self.sources.observe(row);
        self.supervision.observe(&facts);
        self.padding.observe(&facts);
        self.eos.observe(&facts, self.opts.eos_id);
        self.disagreement.observe(&facts);
        self.packing.observe(&facts);
        if let Some(labels) = row.labels.as_deref() {
            self.alignment.observe(row, labels);
            self.negative.observe(row, labels);
        }
    }

    /// The statistics and the findings, at their default severities.
    pub fn finish(mut self) -> (LintStats, Vec<Finding>) {
        self.batching.flush();
        let findings = self.findings();
        let mut labels = self.alignment.stats;
        labels.unexpected_negative = self.negative.tally.positions;
        let s = &self.supervision;
        let stats = LintStats {
            rows: self.rows,
            tokens: self.tokens,
            length: self.lengths.summary(),
            content_length: self.content_lengths.summary(),
            targets: s.targets,
            trained_targets: s.trained_targets,
            trained_fraction: ratio(s.real_trained, s.real_targets),
            trained_fraction_per_row: s.per_row.summary(),
            rows_without_trained_target: s.empty.rows,
            mask_source: self.sources.name(),
            padding: self.padding.stats,
            packing: self.packing.stats,
            labels: (labels.rows > 0).then_some(labels),
            eos: self.opts.eos_id.map(|id| EosStats {
                id,
                targets: self.eos.targets,
                trained: self.eos.trained,
            }),
            disagreeing_positions: self.disagreement.tally.positions,
            batching: self.opts.batch_size.map(|b| self.batching.stats(b)),
        };
        (stats, findings)
    }

    /// Every check's findings, in a fixed order.
    fn findings(&self) -> Vec<Finding> {
        let (opts, unit) = (&self.opts, self.opts.unit);
        let mut out = vec![];
        self.supervision.findings(self.rows, unit, &mut out);
        self.eos.findings(self.rows, opts, &mut out);
        self.alignment.findings(opts, &mut out);
        self.packing.findings(unit, &mut out);
        self.disagreement.findings(unit, &mut out);
        self.padding.findings(unit, &mut out);
        self.negative.findings(unit, &mut out);
        self.sources.findings(&mut out);
        out
    }
}
