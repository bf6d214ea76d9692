//! The lint checks, one type each: what it counts as rows stream past ([`RowFacts`]), and the
//! findings those counts amount to at the end. A new check is a type here with an `observe`
//! and a `findings`, a field of [`LintState`](super::LintState), and a line in each of its
//! `observe` and `findings`. Counters saturate rather than wrap.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::BTreeSet;

use crate::data::{MaskSource, PaddingSpan, Row, Unit, IGNORE_INDEX};
use crate::findings::{Code, Finding, Severity};
use crate::lint::stats::FractionHistogram;
use crate::lint::targets::{document_starts, is_packed, targets, Target};
use crate::lint::{
    BatchingStats, LabelStats, LintOptions, PackingStats, PaddingStats, MIN_LABEL_POSITIONS,
};

/// A count of positions, the rows they are in, and the first of those rows.
#[derive(Debug, Clone, Default)]
pub(super) struct Tally {
    pub(super) positions: u64,
    pub(super) rows: u64,
    pub(super) records: Vec<usize>,
}

impl Tally {
    fn add(&mut self, line: usize, positions: u64) {
        if positions == 0 {
            return;
        }
        self.positions = self.positions.saturating_add(positions);
        self.rows = self.rows.saturating_add(1);
        if self.records.len() < Finding::MAX_RECORDS {
            self.records.push(line);
        }
    }

    /// "first at lines 3, 7", for a finding's message.
    fn first_at(&self, unit: Unit) -> String {
        let unit = match unit {
            Unit::Line => "line",
            Unit::Row => "row",
        };
        let list: Vec<String> = self.records.iter().map(|r| r.to_string()).collect();
        let plural = if list.len() > 1 { "s" } else { "" };
        format!("first at {unit}{plural} {}", list.join(", "))
    }

    /// A finding of `code` whose records are this tally's rows.
    fn finding(&self, code: Code, severity: Severity, message: String) -> Finding {
        Finding::new(code, severity, message).with_records(self.records.clone())
    }
}

/// One validated row, with what every check needs of it computed once.
pub(super) struct RowFacts<'a> {
    pub(super) row: &'a Row,
    pub(super) len: usize,
    /// Its padding, leading and trailing.
    pub(super) padding: PaddingSpan,
    pub(super) shifted: bool,
}

impl RowFacts<'_> {
    fn targets(&self) -> impl Iterator<Item = Target> + '_ {
        targets(self.row, self.shifted)
    }

    fn in_padding(&self, target: &Target) -> bool {
        target.token_index.is_some_and(|i| self.padding.contains(i))
    }
}

/// How much of the data is trained: `no-trained-positions`, `empty-supervision`, and the
/// trained fractions of the statistics.
#[derive(Debug, Clone, Default)]
pub(super) struct Supervision {
    pub(super) targets: u64,
    pub(super) trained_targets: u64,
    pub(super) real_targets: u64,
    pub(super) real_trained: u64,
    pub(super) per_row: FractionHistogram,
    pub(super) empty: Tally,
}

impl Supervision {
    pub(super) fn observe(&mut self, row: &RowFacts) {
        let (mut real, mut real_trained) = (0u64, 0u64);
        for target in row.targets() {
            self.targets = self.targets.saturating_add(1);
            self.trained_targets = self
                .trained_targets
                .saturating_add(u64::from(target.trained));
            if !row.in_padding(&target) {
                real = real.saturating_add(1);
                real_trained = real_trained.saturating_add(u64::from(target.trained));
            }
        }
        self.real_targets = self.real_targets.saturating_add(real);
        self.real_trained = self.real_trained.saturating_add(real_trained);
        if real > 0 {
            self.per_row.add(real_trained as f64 / real as f64);
        }
        if real_trained == 0 {
            self.empty.add(row.row.line, 1);
        }
    }

    pub(super) fn findings(&self, rows: u64, unit: Unit, out: &mut Vec<Finding>) {
        // As `check` finds it: a loss over no target is 0/0, whatever the model.
        if rows > 0 && self.trained_targets == 0 {
            out.push(Finding::new(
                Code::NoTrainedPositions,
                Severity::Error,
                format!(
                    "none of the {} target positions in {rows} rows is trained: check the mask field",
                    self.targets
                ),
            ));
        }
        if self.empty.rows > 0 {
            out.push(self.empty.finding(
                Code::EmptySupervision,
                Severity::Warning,
                format!(
                    "{} of {rows} rows have no trained target after the shift ({}): they add nothing to the loss; an answer truncated away, or a prompt mask over the whole row?",
                    self.empty.rows,
                    self.empty.first_at(unit)
                ),
            ));
        }
    }
}

/// Padding and the trained targets in it: `padding-trained`.
#[derive(Debug, Clone, Default)]
pub(super) struct Padding {
    pub(super) stats: PaddingStats,
    pub(super) trained: Tally,
}

impl Padding {
    pub(super) fn observe(&mut self, row: &RowFacts) {
        let tokens = row.padding.tokens(row.len) as u64;
        if tokens > 0 {
            self.stats.rows = self.stats.rows.saturating_add(1);
            self.stats.tokens = self.stats.tokens.saturating_add(tokens);
            self.stats.left_padded_rows = self
                .stats
                .left_padded_rows
                .saturating_add(u64::from(row.padding.is_left()));
        }
        let trained = row
            .targets()
            .filter(|t| t.trained && row.in_padding(t))
            .count() as u64;
        self.stats.trained = self.stats.trained.saturating_add(trained);
        self.trained.add(row.row.line, trained);
    }

    pub(super) fn findings(&self, unit: Unit, out: &mut Vec<Finding>) {
        if self.trained.positions > 0 {
            out.push(self.trained.finding(
                Code::PaddingTrained,
                Severity::Error,
                format!(
                    "{} padding positions in {} rows are trained targets ({}): the loss includes padding; set their labels to -100 or their loss_mask to 0",
                    self.trained.positions,
                    self.trained.rows,
                    self.trained.first_at(unit)
                ),
            ));
        }
    }
}

/// EOS as a target outside padding (with `--eos-id`): `pad-is-eos`, `eos-masked`,
/// `eos-missing`.
#[derive(Debug, Clone, Default)]
pub(super) struct Eos {
    pub(super) targets: u64,
    pub(super) trained: u64,
    pub(super) untrained: Tally,
}

impl Eos {
    pub(super) fn observe(&mut self, row: &RowFacts, eos_id: Option<i64>) {
        if eos_id.is_none() {
            return;
        }
        let mut untrained = 0u64;
        for target in row.targets() {
            if row.in_padding(&target) || target.token != eos_id {
                continue;
            }
            self.targets = self.targets.saturating_add(1);
            if target.trained {
                self.trained = self.trained.saturating_add(1);
            } else {
                untrained = untrained.saturating_add(1);
            }
        }
        self.untrained.add(row.row.line, untrained);
    }

    pub(super) fn findings(&self, rows: u64, opts: &LintOptions, out: &mut Vec<Finding>) {
        let Some(eos) = opts.eos_id else { return };
        if opts.pad_id == Some(eos) {
            out.push(Finding::new(
                Code::PadIsEos,
                Severity::Info,
                format!("the pad id is the EOS id ({eos}): a collator that sets every pad id to -100 also masks EOS; keep each row's first EOS trained"),
            ));
        }
        if self.targets > 0 && self.trained == 0 {
            out.push(self.untrained.finding(
                Code::EosMasked,
                Severity::Error,
                format!(
                    "EOS (id {eos}) is a target {} times in {} rows and never trained ({}): the model never learns to stop",
                    self.targets,
                    self.untrained.rows,
                    self.untrained.first_at(opts.unit)
                ),
            ));
        } else if self.targets == 0 {
            out.push(Finding::new(
                Code::EosMissing,
                Severity::Warning,
                format!("EOS (id {eos}) is never a target in {rows} rows: the model never learns to stop (is --eos-id right, and does the tokenizer append EOS?)"),
            ));
        }
    }
}

/// Target slots where `loss_mask`, `labels` and `attention_mask` say different things:
/// `mask-label-disagree`. A trained target in padding is left to `padding-trained`, so one
/// bug is one finding.
#[derive(Debug, Clone, Default)]
pub(super) struct Disagreement {
    pub(super) tally: Tally,
}

impl Disagreement {
    pub(super) fn observe(&mut self, row: &RowFacts) {
        let loss_mask = row.row.loss_mask();
        let attention = row.row.given_attention_mask();
        let labels = row.row.labels.as_deref();
        let mut disagree = 0u64;
        for target in row.targets() {
            let by_mask = loss_mask.map(|m| m[target.index] == 1);
            let by_labels = labels.map(|l| l[target.index] != IGNORE_INDEX);
            let fields_differ = matches!((by_mask, by_labels), (Some(a), Some(b)) if a != b);
            // Trained padding is `padding-trained`'s; here only a hole inside the row.
            let trained_at_unattended = attention
                .zip(target.token_index)
                .is_some_and(|(a, i)| a[i] == 0)
                && !row.in_padding(&target)
                && (by_mask == Some(true) || by_labels == Some(true));
            disagree = disagree.saturating_add(u64::from(fields_differ || trained_at_unattended));
        }
        self.tally.add(row.row.line, disagree);
    }

    pub(super) fn findings(&self, unit: Unit, out: &mut Vec<Finding>) {
        if self.tally.positions > 0 {
            out.push(self.tally.finding(
                Code::MaskLabelDisagree,
                Severity::Warning,
                format!(
                    "loss_mask, labels and attention_mask disagree about {} target positions in {} rows ({}): the loss depends on which field the training code reads",
                    self.tally.positions,
                    self.tally.rows,
                    self.tally.first_at(unit)
                ),
            ));
        }
    }
}

/// Packed rows and the document starts in them that are trained:
/// `packed-boundary-supervised`.
#[derive(Debug, Clone, Default)]
pub(super) struct Packing {
    pub(super) stats: PackingStats,
    pub(super) boundaries: Tally,
}

impl Packing {
    pub(super) fn observe(&mut self, row: &RowFacts) {
        let starts = document_starts(row.row, row.padding);
        if !is_packed(row.row, &starts) {
            return;
        }
        let boundaries = starts.len() as u64;
        self.stats.rows = self.stats.rows.saturating_add(1);
        self.stats.documents = self
            .stats
            .documents
            .saturating_add(boundaries.saturating_add(1));
        self.stats.boundaries = self.stats.boundaries.saturating_add(boundaries);
        let supervised = starts
            .iter()
            .filter(|&&s| {
                // Starts are above the content's first index, so `s - 1` is a token.
                let index = if row.shifted { s.saturating_sub(1) } else { s };
                row.row.mask[index] == 1
            })
            .count() as u64;
        self.stats.supervised_boundaries =
            self.stats.supervised_boundaries.saturating_add(supervised);
        self.boundaries.add(row.row.line, supervised);
    }

    pub(super) fn findings(&self, unit: Unit, out: &mut Vec<Finding>) {
        if self.boundaries.positions > 0 {
            out.push(self.boundaries.finding(
                Code::PackedBoundarySupervised,
                Severity::Error,
                format!(
                    "{} of {} document starts in {} packed rows are trained targets ({}): each is predicted from the end of the previous document; set the label at every document start to -100",
                    self.stats.supervised_boundaries,
                    self.stats.boundaries,
                    self.boundaries.rows,
                    self.boundaries.first_at(unit)
                ),
            ));
        }
    }
}

/// Whether labels sit at their own token or at the next one: `labels-pre-shifted`, and
/// `labels-not-shifted` under `--shifted`.
#[derive(Debug, Clone, Default)]
pub(super) struct Alignment {
    pub(super) stats: LabelStats,
    pub(super) pre_shifted: Tally,
    pub(super) not_shifted: Tally,
}

impl Alignment {
    pub(super) fn observe(&mut self, row: &Row, labels: &[i64]) {
        let ids = &row.input_ids;
        let (mut compared, mut same, mut next) = (0u64, 0u64, 0u64);
        for ((&label, &own), &following) in labels.iter().zip(ids).zip(ids.iter().skip(1)) {
            if label >= 0 {
                compared = compared.saturating_add(1);
                same = same.saturating_add(u64::from(label == own));
                next = next.saturating_add(u64::from(label == following));
            }
        }
        self.stats.rows = self.stats.rows.saturating_add(1);
        self.stats.compared = self.stats.compared.saturating_add(compared);
        self.stats.same_position = self.stats.same_position.saturating_add(same);
        self.stats.next_position = self.stats.next_position.saturating_add(next);
        if next > same {
            self.pre_shifted.add(row.line, 1);
        }
        if same > next {
            self.not_shifted.add(row.line, 1);
        }
    }

    pub(super) fn findings(&self, opts: &LintOptions, out: &mut Vec<Finding>) {
        let l = &self.stats;
        if l.compared < MIN_LABEL_POSITIONS {
            return;
        }
        let half = l.compared as f64 / 2.0;
        let percent = |n: u64| 100.0 * n as f64 / l.compared as f64;
        if !opts.shifted && l.next_position as f64 > half && l.next_position > l.same_position {
            out.push(self.pre_shifted.finding(
                Code::LabelsPreShifted,
                Severity::Error,
                format!(
                    "labels equal the next input token at {} of {} labelled positions ({:.1}%) and their own token at {}: the labels are already shifted, and a loss that shifts again trains the token after next ({}); pass --shifted if your loss does not shift",
                    l.next_position,
                    l.compared,
                    percent(l.next_position),
                    l.same_position,
                    self.pre_shifted.first_at(opts.unit)
                ),
            ));
        }
        if opts.shifted && l.same_position as f64 > half && l.same_position > l.next_position {
            out.push(self.not_shifted.finding(
                Code::LabelsNotShifted,
                Severity::Error,
                format!(
                    "the data is declared pre-shifted but labels equal their own input token at {} of {} labelled positions ({:.1}%) and the next token at {}: a loss that does not shift trains each token to predict itself ({})",
                    l.same_position,
                    l.compared,
                    percent(l.same_position),
                    l.next_position,
                    self.not_shifted.first_at(opts.unit)
                ),
            ));
        }
    }
}

/// Negative labels other than the ignore index: `unexpected-negative-label`.
#[derive(Debug, Clone, Default)]
pub(super) struct NegativeLabels {
    pub(super) tally: Tally,
}

impl NegativeLabels {
    pub(super) fn observe(&mut self, row: &Row, labels: &[i64]) {
        let negative = labels
            .iter()
            .filter(|&&l| l < 0 && l != IGNORE_INDEX)
            .count() as u64;
        self.tally.add(row.line, negative);
    }

    pub(super) fn findings(&self, unit: Unit, out: &mut Vec<Finding>) {
        if self.tally.positions > 0 {
            out.push(self.tally.finding(
                Code::UnexpectedNegativeLabel,
                Severity::Error,
                format!(
                    "{} labels in {} rows are negative but not -100 ({}): a loss with ignore_index=-100 rejects them or reads them as classes",
                    self.tally.positions,
                    self.tally.rows,
                    self.tally.first_at(unit)
                ),
            ));
        }
    }
}

/// Which field each row's mask came from: `mixed-mask-source`.
#[derive(Debug, Clone, Default)]
pub(super) struct MaskSources {
    pub(super) seen: BTreeSet<MaskSource>,
}

impl MaskSources {
    pub(super) fn observe(&mut self, row: &Row) {
        self.seen.insert(row.mask_source);
    }

    /// `loss_mask`, `labels`, `attention_mask`, `all_tokens`, `mixed`, or `none`.
    pub(super) fn name(&self) -> String {
        match self.seen.len() {
            1 => self.seen.first().expect("one").as_str().to_string(),
            0 => "none".to_string(),
            _ => "mixed".to_string(),
        }
    }

    pub(super) fn findings(&self, out: &mut Vec<Finding>) {
        if self.seen.len() > 1 {
            let names: Vec<&str> = self.seen.iter().map(|s| s.as_str()).collect();
            out.push(Finding::new(
                Code::MixedMaskSource,
                Severity::Warning,
                format!(
                    "rows take their mask from different fields: {}",
                    names.join(", ")
                ),
            ));
        }
    }
}

/// Batch padding, simulated: rows in file order, `batch_size` at a time, right-padded to the
/// longest of their batch (a statistic, no finding).
#[derive(Debug, Clone, Default)]
pub(super) struct Batching {
    rows: usize,
    tokens: u64,
    longest: usize,
    batches: u64,
    positions: u64,
    added: u64,
}

impl Batching {
    pub(super) fn observe(&mut self, len: usize, batch_size: usize) {
        self.rows = self.rows.saturating_add(1);
        self.tokens = self.tokens.saturating_add(len as u64);
        self.longest = self.longest.max(len);
        if self.rows == batch_size {
            self.flush();
        }
    }

    /// Closes the last, partial batch.
    pub(super) fn flush(&mut self) {
        if self.rows == 0 {
            return;
        }
        let positions = (self.rows as u64).saturating_mul(self.longest as u64);
        self.batches = self.batches.saturating_add(1);
        self.positions = self.positions.saturating_add(positions);
        self.added = self
            .added
            .saturating_add(positions.saturating_sub(self.tokens));
        self.rows = 0;
        self.tokens = 0;
        self.longest = 0;
    }

    pub(super) fn stats(&self, batch_size: usize) -> BatchingStats {
        BatchingStats {
            batch_size,
            batches: self.batches,
            positions: self.positions,
            added_padding: self.added,
            padding_fraction: ratio(self.added, self.positions).unwrap_or(0.0),
        }
    }
}

pub(super) fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}
