//! Model-free checks of how a dataset's labels and masks were built (DOMAIN.md, classes 3–9
//! and 17), as a streaming accumulator: [`LintState::observe`] every row, then
//! [`LintState::finish`] for the statistics and the findings. No I/O; memory does not grow
//! with the number of rows (histograms of lengths, counters, at most
//! [`Finding::MAX_RECORDS`] record numbers a check).
//!
//! **Targets.** Unless the data is declared pre-shifted, labels and masks are aligned with
//! `input_ids` and the loss shifts: the target slots of a row of T tokens are the tokens
//! 1..T (token 0 is never predicted), trained where the row's mask is 1 (`loss_mask`, else
//! `labels != -100`, else `attention_mask`, else every token, as in `check`). With
//! `shifted`, slot t (0..T) predicts `input_ids[t+1]` (its label, for the last slot) and is
//! trained where the mask at t is 1.
//!
//! **Padding** is the trailing run where the given `attention_mask` is 0; without an
//! attention mask, the trailing run of `pad_id` tokens, less its first token when the pad
//! id is the EOS id (that one is the row's EOS). Left padding is not detected.
//!
//! **Thresholds.** Labels count as pre-shifted when, over at least
//! [`MIN_LABEL_POSITIONS`] labelled positions (label ≥ 0, not the last position), more than
//! half equal the next input token and more equal it than equal their own token
//! (`labels-not-shifted`: the reverse, under `shifted`). Every other check fires on a
//! single position or row.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::data::{MaskSource, Row, Unit, IGNORE_INDEX};
use crate::findings::{Code, Finding, Severity};
use crate::stats::{FractionHistogram, FractionSummary, LengthHistogram, LengthSummary};

/// Labelled positions needed before the label alignment is judged.
pub const MIN_LABEL_POSITIONS: u64 = 8;

/// What the checks need to know beyond the rows.
#[derive(Debug, Clone, Default)]
pub struct LintOptions {
    pub pad_id: Option<i64>,
    pub eos_id: Option<i64>,
    /// Labels and masks are aligned with the targets already (`labels[t] == input_ids[t+1]`).
    pub shifted: bool,
    /// Batch size for the padding-fraction statistic; none, none computed.
    pub batch_size: Option<usize>,
    /// What record numbers count, for messages.
    pub unit: Unit,
}

/// One target slot of a row: a position whose prediction the loss may train.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index into the row's labels and masks.
    pub index: usize,
    /// Index of the predicted token in `input_ids`, when it is one of the row's tokens.
    pub token_index: Option<usize>,
    /// The predicted token id, when known.
    pub token: Option<i64>,
    pub trained: bool,
}

/// The target slots of a row (see the module documentation).
pub fn targets(row: &Row, shifted: bool) -> impl Iterator<Item = Target> + '_ {
    let len = row.input_ids.len();
    let (first, last) = if shifted { (0, len) } else { (1, len) };
    (first..last).map(move |index| {
        let trained = row.mask[index] == 1;
        if shifted {
            let token_index = (index + 1 < len).then_some(index + 1);
            let label = row.labels.as_ref().map(|l| l[index]).filter(|&l| l >= 0);
            Target {
                index,
                token_index,
                token: label.or_else(|| token_index.map(|i| row.input_ids[i])),
                trained,
            }
        } else {
            Target {
                index,
                token_index: Some(index),
                token: Some(row.input_ids[index]),
                trained,
            }
        }
    })
}

/// Where the row's trailing padding starts (its length when it has none).
pub fn padding_start(row: &Row, pad_id: Option<i64>, eos_id: Option<i64>) -> usize {
    let len = row.input_ids.len();
    if let Some(attention) = row.given_attention_mask() {
        return len - attention.iter().rev().take_while(|&&a| a == 0).count();
    }
    let Some(pad) = pad_id else {
        return len;
    };
    let run = row
        .input_ids
        .iter()
        .rev()
        .take_while(|&&t| t == pad)
        .count();
    let start = len - run;
    if run > 0 && eos_id == Some(pad) {
        start + 1
    } else {
        start
    }
}

/// Token indices where a packed row's documents start, the first excepted, before
/// `limit` (the padding): from `position_ids` restarting at 0, `seq_lens` and `cu_seqlens`.
pub fn document_starts(row: &Row, limit: usize) -> Vec<usize> {
    let mut starts = BTreeSet::new();
    if let Some(positions) = &row.position_ids {
        starts.extend((1..positions.len()).filter(|&i| positions[i] == 0));
    }
    if let Some(lens) = &row.seq_lens {
        let mut at = 0usize;
        for &n in lens {
            at += n as usize;
            starts.insert(at);
        }
    }
    if let Some(cu) = &row.cu_seqlens {
        starts.extend(cu.iter().map(|&b| b as usize));
    }
    starts.into_iter().filter(|&s| s > 0 && s < limit).collect()
}

/// Whether a row is packed: several documents, or a field that says so.
pub fn is_packed(row: &Row, starts: &[usize]) -> bool {
    !starts.is_empty() || row.seq_lens.is_some() || row.cu_seqlens.is_some()
}

/// A count of positions, the rows they are in, and the first of those rows.
#[derive(Debug, Clone, Default)]
struct Tally {
    positions: u64,
    rows: u64,
    records: Vec<usize>,
}

impl Tally {
    fn add(&mut self, line: usize, positions: u64) {
        if positions == 0 {
            return;
        }
        self.positions += positions;
        self.rows += 1;
        if self.records.len() < Finding::MAX_RECORDS {
            self.records.push(line);
        }
    }
}

/// Batch padding, simulated: rows in file order, `batch_size` at a time, right-padded to the
/// longest of their batch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BatchingStats {
    pub batch_size: usize,
    pub batches: u64,
    /// Token positions of all batches, padding included.
    pub positions: u64,
    /// Positions added by padding rows to the longest of their batch.
    pub added_padding: u64,
    /// `added_padding / positions`.
    pub padding_fraction: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PaddingStats {
    /// Rows that end in padding.
    pub rows: u64,
    /// Trailing padding tokens.
    pub tokens: u64,
    /// Target slots in that padding that are trained.
    pub trained: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PackingStats {
    /// Packed rows.
    pub rows: u64,
    /// Documents in packed rows.
    pub documents: u64,
    /// Document starts after the first document of a row.
    pub boundaries: u64,
    /// Of those, starts whose token is a trained target.
    pub supervised_boundaries: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LabelStats {
    /// Rows with labels.
    pub rows: u64,
    /// Labelled positions compared with the inputs (label ≥ 0, not the row's last).
    pub compared: u64,
    /// Of those, labels equal to the token at their own position.
    pub same_position: u64,
    /// Of those, labels equal to the next token.
    pub next_position: u64,
    /// Negative labels other than -100.
    pub unexpected_negative: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EosStats {
    pub id: i64,
    /// Target slots whose token is EOS (padding excluded).
    pub targets: u64,
    /// Of those, trained.
    pub trained: u64,
}

/// What `lint` measured; the `statistics` object of the JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LintStats {
    pub rows: u64,
    pub tokens: u64,
    /// Row lengths as stored, padding included.
    pub length: Option<LengthSummary>,
    /// Row lengths without trailing padding.
    pub content_length: Option<LengthSummary>,
    /// Target slots after the shift, padding included.
    pub targets: u64,
    /// Of those, trained.
    pub trained_targets: u64,
    /// Trained / all target slots outside padding.
    pub trained_fraction: Option<f64>,
    /// The same per row (rows with at least one target slot outside padding).
    pub trained_fraction_per_row: Option<FractionSummary>,
    /// Rows with no trained target outside padding.
    pub rows_without_trained_target: u64,
    /// `loss_mask`, `labels`, `attention_mask`, `all_tokens`, or `mixed`.
    pub mask_source: String,
    pub padding: PaddingStats,
    pub packing: PackingStats,
    /// Present when some row has labels.
    pub labels: Option<LabelStats>,
    /// Present with `--eos-id`.
    pub eos: Option<EosStats>,
    /// Target slots where loss_mask, labels and attention_mask disagree.
    pub disagreeing_positions: u64,
    /// Present with a batch size.
    pub batching: Option<BatchingStats>,
}

/// The streaming accumulator.
#[derive(Debug, Clone)]
pub struct LintState {
    opts: LintOptions,
    rows: u64,
    tokens: u64,
    lengths: LengthHistogram,
    content_lengths: LengthHistogram,
    targets: u64,
    trained_targets: u64,
    real_targets: u64,
    real_trained: u64,
    per_row: FractionHistogram,
    sources: BTreeSet<MaskSource>,
    empty: Tally,
    padding: PaddingStats,
    padding_trained: Tally,
    packing: PackingStats,
    boundaries: Tally,
    labels: LabelStats,
    pre_shifted_rows: Tally,
    not_shifted_rows: Tally,
    negative: Tally,
    disagree: Tally,
    eos_targets: u64,
    eos_trained: u64,
    eos_untrained: Tally,
    batch: BatchAccumulator,
}

#[derive(Debug, Clone, Default)]
struct BatchAccumulator {
    rows: usize,
    tokens: u64,
    longest: usize,
    batches: u64,
    positions: u64,
    added: u64,
}

impl BatchAccumulator {
    fn push(&mut self, len: usize, batch_size: usize) {
        self.rows += 1;
        self.tokens += len as u64;
        self.longest = self.longest.max(len);
        if self.rows == batch_size {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.rows == 0 {
            return;
        }
        let positions = (self.rows * self.longest) as u64;
        self.batches += 1;
        self.positions += positions;
        self.added += positions - self.tokens;
        self.rows = 0;
        self.tokens = 0;
        self.longest = 0;
    }
}

impl LintState {
    pub fn new(opts: LintOptions) -> Self {
        Self {
            opts,
            rows: 0,
            tokens: 0,
            lengths: LengthHistogram::default(),
            content_lengths: LengthHistogram::default(),
            targets: 0,
            trained_targets: 0,
            real_targets: 0,
            real_trained: 0,
            per_row: FractionHistogram::default(),
            sources: BTreeSet::new(),
            empty: Tally::default(),
            padding: PaddingStats::default(),
            padding_trained: Tally::default(),
            packing: PackingStats::default(),
            boundaries: Tally::default(),
            labels: LabelStats::default(),
            pre_shifted_rows: Tally::default(),
            not_shifted_rows: Tally::default(),
            negative: Tally::default(),
            disagree: Tally::default(),
            eos_targets: 0,
            eos_trained: 0,
            eos_untrained: Tally::default(),
            batch: BatchAccumulator::default(),
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
        let shifted = self.opts.shifted;
        let pad_start = padding_start(row, self.opts.pad_id, self.opts.eos_id);
        self.rows += 1;
        self.tokens += len as u64;
        self.lengths.add(len);
        self.content_lengths.add(pad_start);
        self.sources.insert(row.mask_source);
        if pad_start < len {
            self.padding.rows += 1;
            self.padding.tokens += (len - pad_start) as u64;
        }
        if let Some(batch_size) = self.opts.batch_size {
            self.batch.push(len, batch_size);
        }

        let loss_mask = row.loss_mask();
        let attention = row.given_attention_mask();
        let labels = row.labels.as_deref();
        let (mut real, mut real_trained, mut padding_trained) = (0u64, 0u64, 0u64);
        let (mut disagree, mut eos_untrained) = (0u64, 0u64);
        for target in targets(row, shifted) {
            self.targets += 1;
            self.trained_targets += u64::from(target.trained);
            let in_padding = target.token_index.is_some_and(|i| i >= pad_start);
            if in_padding {
                padding_trained += u64::from(target.trained);
            } else {
                real += 1;
                real_trained += u64::from(target.trained);
                if self.opts.eos_id.is_some() && target.token == self.opts.eos_id {
                    self.eos_targets += 1;
                    if target.trained {
                        self.eos_trained += 1;
                    } else {
                        eos_untrained += 1;
                    }
                }
            }
            let by_mask = loss_mask.map(|m| m[target.index] == 1);
            let by_labels = labels.map(|l| l[target.index] != IGNORE_INDEX);
            let fields_differ = matches!((by_mask, by_labels), (Some(a), Some(b)) if a != b);
            let trained_at_unattended = attention
                .zip(target.token_index)
                .is_some_and(|(a, i)| a[i] == 0)
                && (by_mask == Some(true) || by_labels == Some(true));
            disagree += u64::from(fields_differ || trained_at_unattended);
        }
        self.real_targets += real;
        self.real_trained += real_trained;
        if real > 0 {
            self.per_row.add(real_trained as f64 / real as f64);
        }
        if real_trained == 0 {
            self.empty.add(row.line, 1);
        }
        self.padding.trained += padding_trained;
        self.padding_trained.add(row.line, padding_trained);
        self.disagree.add(row.line, disagree);
        self.eos_untrained.add(row.line, eos_untrained);

        let starts = document_starts(row, pad_start);
        if is_packed(row, &starts) {
            self.packing.rows += 1;
            self.packing.documents += starts.len() as u64 + 1;
            self.packing.boundaries += starts.len() as u64;
            let supervised = starts
                .iter()
                .filter(|&&s| {
                    let index = if shifted { s - 1 } else { s };
                    row.mask[index] == 1
                })
                .count() as u64;
            self.packing.supervised_boundaries += supervised;
            self.boundaries.add(row.line, supervised);
        }

        if let Some(labels) = labels {
            self.observe_labels(row, labels);
        }
    }

    fn observe_labels(&mut self, row: &Row, labels: &[i64]) {
        let ids = &row.input_ids;
        let (mut compared, mut same, mut next, mut negative) = (0u64, 0u64, 0u64, 0u64);
        for (i, &label) in labels.iter().enumerate() {
            if label < 0 {
                negative += u64::from(label != IGNORE_INDEX);
                continue;
            }
            if i + 1 < ids.len() {
                compared += 1;
                same += u64::from(label == ids[i]);
                next += u64::from(label == ids[i + 1]);
            }
        }
        self.labels.rows += 1;
        self.labels.compared += compared;
        self.labels.same_position += same;
        self.labels.next_position += next;
        self.labels.unexpected_negative += negative;
        self.negative.add(row.line, negative);
        if next > same {
            self.pre_shifted_rows.add(row.line, 1);
        }
        if same > next {
            self.not_shifted_rows.add(row.line, 1);
        }
    }

    /// The statistics and the findings, at their default severities.
    pub fn finish(mut self) -> (LintStats, Vec<Finding>) {
        self.batch.flush();
        let findings = self.findings();
        let mask_source = match self.sources.len() {
            1 => self.sources.first().expect("one").as_str().to_string(),
            0 => "none".to_string(),
            _ => "mixed".to_string(),
        };
        let batching = self.opts.batch_size.map(|batch_size| BatchingStats {
            batch_size,
            batches: self.batch.batches,
            positions: self.batch.positions,
            added_padding: self.batch.added,
            padding_fraction: ratio(self.batch.added, self.batch.positions).unwrap_or(0.0),
        });
        let stats = LintStats {
            rows: self.rows,
            tokens: self.tokens,
            length: self.lengths.summary(),
            content_length: self.content_lengths.summary(),
            targets: self.targets,
            trained_targets: self.trained_targets,
            trained_fraction: ratio(self.real_trained, self.real_targets),
            trained_fraction_per_row: self.per_row.summary(),
            rows_without_trained_target: self.empty.rows,
            mask_source,
            padding: self.padding,
            packing: self.packing,
            labels: (self.labels.rows > 0).then_some(self.labels),
            eos: self.opts.eos_id.map(|id| EosStats {
                id,
                targets: self.eos_targets,
                trained: self.eos_trained,
            }),
            disagreeing_positions: self.disagree.positions,
            batching,
        };
        (stats, findings)
    }

    fn records(&self, t: &Tally) -> String {
        let unit = match self.opts.unit {
            Unit::Line => "line",
            Unit::Row => "row",
        };
        let list: Vec<String> = t.records.iter().map(|r| r.to_string()).collect();
        let plural = if list.len() > 1 { "s" } else { "" };
        format!("first at {unit}{plural} {}", list.join(", "))
    }

    fn findings(&self) -> Vec<Finding> {
        let mut out = vec![];
        let rows = self.rows;
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
            out.push(
                Finding::new(
                    Code::EmptySupervision,
                    Severity::Warning,
                    format!(
                        "{} of {rows} rows have no trained target after the shift ({}): they add nothing to the loss; an answer truncated away, or a prompt mask over the whole row?",
                        self.empty.rows,
                        self.records(&self.empty)
                    ),
                )
                .with_records(self.empty.records.clone()),
            );
        }
        if let Some(eos) = self.opts.eos_id {
            if self.opts.pad_id == Some(eos) {
                out.push(Finding::new(
                    Code::PadIsEos,
                    Severity::Info,
                    format!("the pad id is the EOS id ({eos}): a collator that sets every pad id to -100 also masks EOS; keep each row's first EOS trained"),
                ));
            }
            if self.eos_targets > 0 && self.eos_trained == 0 {
                out.push(
                    Finding::new(
                        Code::EosMasked,
                        Severity::Error,
                        format!(
                            "EOS (id {eos}) is a target {} times in {} rows and never trained ({}): the model never learns to stop",
                            self.eos_targets,
                            self.eos_untrained.rows,
                            self.records(&self.eos_untrained)
                        ),
                    )
                    .with_records(self.eos_untrained.records.clone()),
                );
            } else if self.eos_targets == 0 {
                out.push(Finding::new(
                    Code::EosMissing,
                    Severity::Warning,
                    format!("EOS (id {eos}) is never a target in {rows} rows: the model never learns to stop (is --eos-id right, and does the tokenizer append EOS?)"),
                ));
            }
        }
        let l = &self.labels;
        if l.compared >= MIN_LABEL_POSITIONS {
            let half = l.compared as f64 / 2.0;
            if !self.opts.shifted
                && l.next_position as f64 > half
                && l.next_position > l.same_position
            {
                out.push(
                    Finding::new(
                        Code::LabelsPreShifted,
                        Severity::Error,
                        format!(
                            "labels equal the next input token at {} of {} labelled positions ({:.1}%) and their own token at {}: the labels are already shifted, and a loss that shifts again trains the token after next ({}); pass --shifted if your loss does not shift",
                            l.next_position,
                            l.compared,
                            100.0 * l.next_position as f64 / l.compared as f64,
                            l.same_position,
                            self.records(&self.pre_shifted_rows)
                        ),
                    )
                    .with_records(self.pre_shifted_rows.records.clone()),
                );
            }
            if self.opts.shifted
                && l.same_position as f64 > half
                && l.same_position > l.next_position
            {
                out.push(
                    Finding::new(
                        Code::LabelsNotShifted,
                        Severity::Error,
                        format!(
                            "the data is declared pre-shifted but labels equal their own input token at {} of {} labelled positions ({:.1}%) and the next token at {}: a loss that does not shift trains each token to predict itself ({})",
                            l.same_position,
                            l.compared,
                            100.0 * l.same_position as f64 / l.compared as f64,
                            l.next_position,
                            self.records(&self.not_shifted_rows)
                        ),
                    )
                    .with_records(self.not_shifted_rows.records.clone()),
                );
            }
        }
        if self.boundaries.positions > 0 {
            out.push(
                Finding::new(
                    Code::PackedBoundarySupervised,
                    Severity::Error,
                    format!(
                        "{} of {} document starts in {} packed rows are trained targets ({}): each is predicted from the end of the previous document; set the label at every document start to -100",
                        self.packing.supervised_boundaries,
                        self.packing.boundaries,
                        self.boundaries.rows,
                        self.records(&self.boundaries)
                    ),
                )
                .with_records(self.boundaries.records.clone()),
            );
        }
        if self.disagree.positions > 0 {
            out.push(
                Finding::new(
                    Code::MaskLabelDisagree,
                    Severity::Warning,
                    format!(
                        "loss_mask, labels and attention_mask disagree about {} target positions in {} rows ({}): the loss depends on which field the training code reads",
                        self.disagree.positions,
                        self.disagree.rows,
                        self.records(&self.disagree)
                    ),
                )
                .with_records(self.disagree.records.clone()),
            );
        }
        if self.padding_trained.positions > 0 {
            out.push(
                Finding::new(
                    Code::PaddingTrained,
                    Severity::Error,
                    format!(
                        "{} trailing padding positions in {} rows are trained targets ({}): the loss includes padding; set their labels to -100 or their loss_mask to 0",
                        self.padding_trained.positions,
                        self.padding_trained.rows,
                        self.records(&self.padding_trained)
                    ),
                )
                .with_records(self.padding_trained.records.clone()),
            );
        }
        if self.negative.positions > 0 {
            out.push(
                Finding::new(
                    Code::UnexpectedNegativeLabel,
                    Severity::Error,
                    format!(
                        "{} labels in {} rows are negative but not -100 ({}): a loss with ignore_index=-100 rejects them or reads them as classes",
                        self.negative.positions,
                        self.negative.rows,
                        self.records(&self.negative)
                    ),
                )
                .with_records(self.negative.records.clone()),
            );
        }
        if self.sources.len() > 1 {
            let names: Vec<&str> = self.sources.iter().map(|s| s.as_str()).collect();
            out.push(Finding::new(
                Code::MixedMaskSource,
                Severity::Warning,
                format!(
                    "rows take their mask from different fields: {}",
                    names.join(", ")
                ),
            ));
        }
        out
    }
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{parse_row, FieldNames};

    fn row(line: usize, json: &str) -> Row {
        parse_row(json, "t.jsonl", line, &FieldNames::default()).unwrap()
    }

    fn lint(opts: LintOptions, rows: &[&str]) -> (LintStats, Vec<Finding>) {
        let mut state = LintState::new(opts);
        for (i, json) in rows.iter().enumerate() {
            state.observe(&row(i + 1, json));
        }
        state.finish()
    }

    fn codes(findings: &[Finding]) -> Vec<(Code, Severity)> {
        findings.iter().map(|f| (f.code, f.severity)).collect()
    }

    fn pad0() -> LintOptions {
        LintOptions {
            pad_id: Some(0),
            ..LintOptions::default()
        }
    }

    #[test]
    fn clean_sft_rows_have_no_findings() {
        let (stats, findings) = lint(
            LintOptions {
                eos_id: Some(2),
                batch_size: Some(2),
                ..pad0()
            },
            &[
                r#"{"input_ids":[1,5,6,7,2,0,0],"labels":[-100,-100,6,7,2,-100,-100],"attention_mask":[1,1,1,1,1,0,0]}"#,
                r#"{"input_ids":[1,8,9,2],"labels":[-100,8,9,2]}"#,
                r#"{"input_ids":[1,3,4,5,6,2],"labels":[-100,-100,-100,5,6,2]}"#,
            ],
        );
        assert_eq!(codes(&findings), vec![]);
        assert_eq!(stats.rows, 3);
        assert_eq!(stats.tokens, 17);
        assert_eq!(
            stats.padding,
            PaddingStats {
                rows: 1,
                tokens: 2,
                trained: 0
            }
        );
        let length = stats.length.unwrap();
        assert_eq!((length.min, length.median, length.max), (4, 6, 7));
        assert_eq!(stats.content_length.unwrap().max, 6);
        assert_eq!(stats.targets, 14);
        assert_eq!(stats.trained_targets, 9);
        // Outside padding: 4 + 3 + 5 targets, 3 + 3 + 3 trained.
        assert_eq!(stats.trained_fraction, Some(9.0 / 12.0));
        let per_row = stats.trained_fraction_per_row.unwrap();
        assert_eq!((per_row.min, per_row.max), (0.6, 1.0));
        assert_eq!(stats.eos.unwrap().trained, 3);
        let labels = stats.labels.unwrap();
        assert_eq!(labels.next_position, 0);
        assert_eq!(labels.compared, labels.same_position);
        // Batches [7, 4] and [6]: 14 + 6 positions, 3 added.
        let b = stats.batching.unwrap();
        assert_eq!((b.batches, b.positions, b.added_padding), (2, 20, 3));
        assert_eq!(stats.mask_source, "labels");
    }

    #[test]
    fn no_trained_target_at_all_is_an_error_as_in_check() {
        let (stats, findings) = lint(
            LintOptions::default(),
            &[
                r#"{"input_ids":[1,5,6],"labels":[1,-100,-100]}"#,
                r#"{"input_ids":[7,8],"labels":[7,-100]}"#,
            ],
        );
        assert_eq!(stats.trained_targets, 0);
        assert_eq!(
            codes(&findings),
            vec![
                (Code::NoTrainedPositions, Severity::Error),
                (Code::EmptySupervision, Severity::Warning)
            ]
        );
        assert_eq!(
            findings[0].message,
            "none of the 3 target positions in 2 rows is trained: check the mask field"
        );
    }

    #[test]
    fn empty_supervision_counts_rows_after_the_shift() {
        let (stats, findings) = lint(
            LintOptions::default(),
            &[
                r#"{"input_ids":[1,5,6],"labels":[1,-100,-100]}"#,
                r#"{"input_ids":[1,5,6],"labels":[-100,5,6]}"#,
                r#"{"input_ids":[7],"labels":[7]}"#,
            ],
        );
        assert_eq!(
            codes(&findings),
            vec![(Code::EmptySupervision, Severity::Warning)]
        );
        assert_eq!(findings[0].records, vec![1, 3]);
        assert!(
            findings[0].message.starts_with("2 of 3 rows"),
            "{}",
            findings[0].message
        );
        assert!(findings[0].message.contains("first at lines 1, 3"));
        assert_eq!(stats.rows_without_trained_target, 2);
    }

    #[test]
    fn eos_masked_when_pad_is_eos_and_every_pad_was_ignored() {
        let rows = [
            r#"{"input_ids":[1,5,6,2,2,2],"labels":[-100,5,6,-100,-100,-100]}"#,
            r#"{"input_ids":[1,7,2],"labels":[-100,7,-100]}"#,
        ];
        let opts = LintOptions {
            pad_id: Some(2),
            eos_id: Some(2),
            ..LintOptions::default()
        };
        let (stats, findings) = lint(opts.clone(), &rows);
        assert_eq!(
            codes(&findings),
            vec![
                (Code::PadIsEos, Severity::Info),
                (Code::EosMasked, Severity::Error)
            ]
        );
        // Padding excluded: one EOS a row.
        assert_eq!(stats.eos.unwrap().targets, 2);
        assert_eq!(stats.padding.tokens, 2);
        // A collator that keeps the first EOS: only the info remains.
        let (_, findings) = lint(
            opts,
            &[r#"{"input_ids":[1,5,6,2,2,2],"labels":[-100,5,6,2,-100,-100]}"#],
        );
        assert_eq!(codes(&findings), vec![(Code::PadIsEos, Severity::Info)]);
        // No EOS at all.
        let (_, findings) = lint(
            LintOptions {
                eos_id: Some(2),
                ..LintOptions::default()
            },
            &[r#"{"input_ids":[1,5,6]}"#],
        );
        assert_eq!(
            codes(&findings),
            vec![(Code::EosMissing, Severity::Warning)]
        );
    }

    const PRE_SHIFTED: &str =
        r#"{"input_ids":[1,5,6,7,8,9,10,11,12],"labels":[5,6,7,8,9,10,11,12,2]}"#;
    const ALIGNED: &str =
        r#"{"input_ids":[1,5,6,7,8,9,10,11,12,13],"labels":[-100,5,6,7,8,9,10,11,12,13]}"#;

    #[test]
    fn pre_shifted_labels_are_caught_and_turn_round_with_shifted() {
        let (stats, findings) = lint(LintOptions::default(), &[PRE_SHIFTED]);
        assert_eq!(
            codes(&findings),
            vec![(Code::LabelsPreShifted, Severity::Error)]
        );
        let l = stats.labels.unwrap();
        assert_eq!((l.compared, l.next_position, l.same_position), (8, 8, 0));
        let shifted = LintOptions {
            shifted: true,
            ..LintOptions::default()
        };
        assert_eq!(codes(&lint(shifted.clone(), &[PRE_SHIFTED]).1), vec![]);
        assert_eq!(
            codes(&lint(shifted, &[ALIGNED]).1),
            vec![(Code::LabelsNotShifted, Severity::Error)]
        );
        assert_eq!(codes(&lint(LintOptions::default(), &[ALIGNED]).1), vec![]);
        // Too few labelled positions to judge.
        let (_, findings) = lint(
            LintOptions::default(),
            &[r#"{"input_ids":[1,5,6],"labels":[5,6,2]}"#],
        );
        assert_eq!(codes(&findings), vec![]);
    }

    #[test]
    fn shifted_targets_include_the_last_label() {
        let r = row(
            1,
            r#"{"input_ids":[1,5,6],"labels":[5,6,2],"loss_mask":[0,1,1]}"#,
        );
        let t: Vec<Target> = targets(&r, true).collect();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].token, t[0].trained), (Some(5), false));
        assert_eq!((t[2].token, t[2].token_index), (Some(2), None));
        let t: Vec<Target> = targets(&r, false).collect();
        assert_eq!(t.iter().map(|t| t.index).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn packed_boundaries_from_position_ids_seq_lens_and_cu_seqlens() {
        let bad = [
            r#"{"input_ids":[1,5,6,1,7,8],"labels":[-100,5,6,1,7,8],"position_ids":[0,1,2,0,1,2]}"#,
            r#"{"input_ids":[1,5,6,1,7,8],"labels":[-100,5,6,-100,7,8],"seq_lens":[3,3]}"#,
            r#"{"input_ids":[1,5,1,7,1,8],"labels":[-100,5,1,7,-100,8],"cu_seqlens":[0,2,4,6]}"#,
        ];
        let (stats, findings) = lint(LintOptions::default(), &bad);
        assert_eq!(
            codes(&findings),
            vec![(Code::PackedBoundarySupervised, Severity::Error)]
        );
        assert_eq!(findings[0].records, vec![1, 3]);
        assert_eq!(
            stats.packing,
            PackingStats {
                rows: 3,
                documents: 7,
                boundaries: 4,
                supervised_boundaries: 2
            }
        );
        let good = r#"{"input_ids":[1,5,6,1,7,8,0,0],"labels":[-100,5,6,-100,7,8,-100,-100],"position_ids":[0,1,2,0,1,2,0,0],"attention_mask":[1,1,1,1,1,1,0,0]}"#;
        let (stats, findings) = lint(pad0(), &[good]);
        assert_eq!(codes(&findings), vec![]);
        // The padding's restart is not a document.
        assert_eq!(stats.packing.documents, 2);
        // Shifted: the start's slot is the one before it.
        let shifted =
            r#"{"input_ids":[1,5,6,1,7],"labels":[5,6,-100,7,2],"position_ids":[0,1,2,0,1]}"#;
        let opts = LintOptions {
            shifted: true,
            ..LintOptions::default()
        };
        assert_eq!(codes(&lint(opts, &[shifted]).1), vec![]);
    }

    #[test]
    fn mask_label_disagreement_counts_positions() {
        let (stats, findings) = lint(
            LintOptions::default(),
            &[
                r#"{"input_ids":[1,5,6,7],"labels":[-100,-100,6,7],"loss_mask":[0,1,1,1]}"#,
                r#"{"input_ids":[1,5,6,0],"labels":[-100,5,6,0],"attention_mask":[1,1,1,0]}"#,
            ],
        );
        assert_eq!(
            codes(&findings),
            vec![
                (Code::MaskLabelDisagree, Severity::Warning),
                (Code::PaddingTrained, Severity::Error),
                (Code::MixedMaskSource, Severity::Warning),
            ]
        );
        assert_eq!(stats.disagreeing_positions, 2);
        assert_eq!(findings[0].records, vec![1, 2]);
        assert_eq!(findings[1].records, vec![2]);
    }

    #[test]
    fn padding_trained_by_pad_id_without_an_attention_mask() {
        // The founding bug: pre-padded rows with no mask at all.
        let (stats, findings) = lint(pad0(), &[r#"{"input_ids":[1,5,6,2,0,0,0]}"#]);
        assert_eq!(
            codes(&findings),
            vec![(Code::PaddingTrained, Severity::Error)]
        );
        assert_eq!(stats.padding.trained, 3);
        // Without --pad-id nothing is padding.
        assert_eq!(
            codes(
                &lint(
                    LintOptions::default(),
                    &[r#"{"input_ids":[1,5,6,2,0,0,0]}"#]
                )
                .1
            ),
            vec![]
        );
        // A loss mask that zeroes the padding is clean.
        let (_, findings) = lint(
            pad0(),
            &[r#"{"input_ids":[1,5,6,2,0,0],"loss_mask":[0,1,1,1,0,0]}"#],
        );
        assert_eq!(codes(&findings), vec![]);
    }

    #[test]
    fn negative_labels_other_than_the_ignore_index() {
        let (stats, findings) = lint(
            LintOptions::default(),
            &[r#"{"input_ids":[1,5,6,0],"labels":[-1,5,6,-1]}"#],
        );
        assert_eq!(
            codes(&findings),
            vec![(Code::UnexpectedNegativeLabel, Severity::Error)]
        );
        assert_eq!(stats.labels.unwrap().unexpected_negative, 2);
        assert!(findings[0].message.contains("first at line 1"));
    }

    #[test]
    fn records_say_rows_for_parquet() {
        let opts = LintOptions {
            unit: Unit::Row,
            ..LintOptions::default()
        };
        let (_, findings) = lint(opts, &[r#"{"input_ids":[7]}"#, r#"{"input_ids":[7,8]}"#]);
        assert_eq!(findings[0].code, Code::EmptySupervision);
        assert!(findings[0].message.contains("first at row 1"));
    }
}
