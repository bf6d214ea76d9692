//! Model-free checks of how a dataset's labels and masks were built (padding trained, EOS
//! masked, labels shifted twice or not at all, mask and labels disagreeing, packed documents
//! supervised across their boundary: docs/guide.md, "maskaudit lint"), as a streaming
//! accumulator: [`LintState::observe`] every row, then [`LintState::finish`] for the
//! statistics and the findings. No I/O; memory does not grow
//! with the number of rows (histograms of lengths, counters, at most
//! [`Finding::MAX_RECORDS`](crate::findings::Finding::MAX_RECORDS) record numbers a check).
//!
//! **Targets.** Unless the data is declared pre-shifted, labels and masks are aligned with
//! `input_ids` and the loss shifts: the target slots of a row of T tokens are the tokens
//! 1..T (token 0 is never predicted), trained where the row's mask is 1 (`loss_mask`, else
//! `labels != -100`, else `attention_mask`, else every token, as in `check`). With
//! `shifted`, slot t (0..T) predicts `input_ids[t+1]` (its label, for the last slot) and is
//! trained where the mask at t is 1.
//!
//! **Padding** is what [`crate::data::padding`] says, the definition `check` counts with too:
//! the trailing (and leading) run where the given `attention_mask` is 0; without an
//! attention mask, the trailing run of `pad_id` tokens, less its first token when the pad
//! id is the EOS id (that one is the row's EOS), or, in a row without one, a leading run of
//! `pad_id` tokens followed by another token (left padding).
//!
//! **Thresholds.** Labels count as pre-shifted when, over at least
//! [`MIN_LABEL_POSITIONS`] labelled positions (label ≥ 0, not the last position), more than
//! half equal the next input token and more equal it than equal their own token
//! (`labels-not-shifted`: the reverse, under `shifted`). Every other check fires on a
//! single position or row.

mod checks;
mod state;
pub mod stats;
mod targets;
pub mod tokenizer;
pub mod view;

pub use state::LintState;
pub use targets::{document_starts, is_packed, padding, targets, Target};

use serde::Serialize;

use crate::data::Unit;
use crate::lint::stats::{FractionSummary, LengthSummary};

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
    /// Rows with padding, leading or trailing.
    pub rows: u64,
    /// Padding tokens, leading and trailing.
    pub tokens: u64,
    /// Target slots in that padding that are trained.
    pub trained: u64,
    /// Of `rows`, those padded on the left.
    pub left_padded_rows: u64,
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
    /// Row lengths without padding.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Row;
    use crate::data::{parse_row, FieldNames};
    use crate::findings::{Code, Finding, Severity};

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
                trained: 0,
                left_padded_rows: 0
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
        // Row 2's trained padding is padding-trained's alone; a hole inside a row is not.
        assert_eq!(stats.disagreeing_positions, 1);
        assert_eq!(findings[0].records, vec![1]);
        assert_eq!(findings[1].records, vec![2]);
        let (stats, findings) = lint(
            LintOptions::default(),
            &[r#"{"input_ids":[1,5,6,7],"labels":[-100,5,6,7],"attention_mask":[1,0,1,1]}"#],
        );
        assert_eq!(
            codes(&findings),
            vec![(Code::MaskLabelDisagree, Severity::Warning)]
        );
        assert_eq!(stats.disagreeing_positions, 1);
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
    fn left_padding_is_padding_too() {
        let (stats, findings) = lint(
            pad0(),
            &[
                r#"{"input_ids":[0,0,0,1,5,6,2],"labels":[0,0,0,1,5,6,2]}"#,
                r#"{"input_ids":[0,0,1,5,6,2],"attention_mask":[0,0,1,1,1,1],"labels":[-100,-100,1,5,6,2]}"#,
                r#"{"input_ids":[0,5,6,2,0],"labels":[0,5,6,2,-100]}"#,
            ],
        );
        // Row 1: tokens 1 and 2 are padding targets, trained.
        assert_eq!(
            codes(&findings),
            vec![(Code::PaddingTrained, Severity::Error)]
        );
        assert_eq!(findings[0].records, vec![1]);
        assert_eq!(
            stats.padding,
            PaddingStats {
                rows: 3,
                tokens: 6,
                trained: 2,
                left_padded_rows: 2
            }
        );
        assert_eq!(stats.content_length.unwrap().max, 4);
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
