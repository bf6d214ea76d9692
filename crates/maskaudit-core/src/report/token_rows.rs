//! Per-token rows for the HTML report (`--html`): the first rows of a run, each token with
//! whether it is a trained target, whether it is padding, and (for `check`) its loss.
//!
//! A token's loss is the cross-entropy of the logits one position before it, predicting it:
//! token t carries ℓ[t-1] and m[t-1] (the row's first token is never a target). `lint` has
//! no model, so its rows carry no losses. Pure code: `check` fills these while its batches
//! run, bounded by `--html-rows`.

use crate::data::batch::Batch;
use crate::data::PaddingRule;
use crate::data::{Pos, Row, Unit};
use crate::lint::targets;

/// One token of a shown row.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenCell {
    pub id: i64,
    /// Whether this token is a target after the shift (every token but the row's first,
    /// under `--shifted` every token but the first whose previous label slot exists).
    pub target: bool,
    /// A trained target: its loss counts in the masked token mean.
    pub trained: bool,
    /// Padding, as `lint` and `check` count it ([`crate::data::padding`]): the row's
    /// leading or trailing attention-0 run, else its pad-id run, and what batching appended.
    pub padding: bool,
    /// The per-token loss predicting this token; `None` for the first token and under `lint`.
    pub loss: Option<f32>,
    /// The weight this token's cross-entropy has in the user's loss (∂loss/∂ℓ, from the
    /// gradient weight map, `crate::loss::weights`); `None` without a loss that takes logits.
    pub loss_weight: Option<f32>,
}

/// A shown row: where it is in the file, and its tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRow {
    pub record: Pos,
    pub tokens: Vec<TokenCell>,
}

/// The token view of a lint row, without losses (the same target rules as the terminal view).
pub fn from_row(
    row: &Row,
    unit: Unit,
    pad_id: Option<i64>,
    eos_id: Option<i64>,
    shifted: bool,
) -> TokenRow {
    let span = PaddingRule::new(pad_id, eos_id).of_row(row);
    let mut tokens: Vec<TokenCell> = row
        .input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| TokenCell {
            id,
            target: false,
            trained: false,
            padding: span.contains(i),
            loss: None,
            loss_weight: None,
        })
        .collect();
    for target in targets(row, shifted) {
        if let Some(i) = target.token_index {
            tokens[i].target = true;
            tokens[i].trained = target.trained;
        }
    }
    TokenRow {
        record: Pos { unit, n: row.line },
        tokens,
    }
}

/// The rows of a `check` batch with their per-token losses (`losses` is `[rows, seq_len-1]`,
/// empty when the batch has no next-token position) and, with a loss, their gradient weights
/// (same shape), at most `limit` of them.
pub fn from_batch(
    batch: &Batch,
    losses: &[f32],
    weights: Option<&[f64]>,
    unit: Unit,
    limit: usize,
) -> Vec<TokenRow> {
    let t = batch.seq_len;
    let positions = t.saturating_sub(1);
    let target_mask = batch.target_mask();
    (0..batch.rows.min(limit))
        .map(|b| {
            let ids = &batch.input_ids[b * t..(b + 1) * t];
            let padding = &batch.padding[b * t..(b + 1) * t];
            let tokens = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| {
                    let slot = (i > 0).then(|| b * positions + i - 1);
                    TokenCell {
                        id,
                        target: i > 0,
                        trained: slot.is_some_and(|s| target_mask.get(s) == Some(&1)),
                        padding: padding[i] != 0,
                        loss: slot.and_then(|s| losses.get(s).copied()),
                        loss_weight: slot
                            .and_then(|s| weights.and_then(|w| w.get(s)))
                            .map(|&w| w as f32),
                    }
                })
                .collect();
            TokenRow {
                record: Pos {
                    unit,
                    n: batch.lines[b],
                },
                tokens,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::Batcher;
    use crate::data::{parse_row, FieldNames};

    fn row(json: &str, line: usize) -> Row {
        parse_row(json, "t", line, &FieldNames::default()).unwrap()
    }

    #[test]
    fn lint_rows_mark_targets_training_and_padding() {
        let r = from_row(
            &row(
                r#"{"input_ids":[1,5,6,0,0],"labels":[-100,-100,6,0,-100]}"#,
                3,
            ),
            Unit::Line,
            Some(0),
            None,
            false,
        );
        assert_eq!(r.record, Pos::line(3));
        let flags: Vec<(bool, bool, bool)> = r
            .tokens
            .iter()
            .map(|c| (c.target, c.trained, c.padding))
            .collect();
        assert_eq!(
            flags,
            vec![
                (false, false, false),
                (true, false, false),
                (true, true, false),
                (true, true, true),
                (true, false, true)
            ]
        );
        assert!(r.tokens.iter().all(|c| c.loss.is_none()));
    }

    #[test]
    fn batch_rows_carry_the_loss_predicting_each_token() {
        let mut batcher = Batcher::new(2, Some(0), "d.jsonl");
        assert!(batcher
            .push(row(r#"{"input_ids":[1,5,6]}"#, 1))
            .unwrap()
            .is_none());
        let batch = batcher
            .push(row(r#"{"input_ids":[1,7]}"#, 2))
            .unwrap()
            .expect("a batch of two rows");
        // [2 rows, 2 positions]
        let losses = [0.5, 0.25, 2.0, 9.0];
        let rows = from_batch(&batch, &losses, None, Unit::Line, 5);
        assert_eq!(rows.len(), 2);
        let first: Vec<Option<f32>> = rows[0].tokens.iter().map(|c| c.loss).collect();
        assert_eq!(first, vec![None, Some(0.5), Some(0.25)]);
        let second = &rows[1].tokens;
        assert_eq!(second[1].loss, Some(2.0));
        // The batcher's padding: a target, untrained, padding, with the loss the model gave it.
        assert_eq!(
            (
                second[2].target,
                second[2].trained,
                second[2].padding,
                second[2].loss
            ),
            (true, false, true, Some(9.0))
        );
        assert_eq!(rows[1].record, Pos::line(2));
        assert_eq!(from_batch(&batch, &losses, None, Unit::Line, 1).len(), 1);
    }

    #[test]
    fn batch_rows_show_the_padding_lint_shows() {
        let rows = [
            r#"{"input_ids":[1,5,2,2,2]}"#,
            r#"{"input_ids":[2,2,5,6,7],"labels":[2,2,5,6,7]}"#,
            r#"{"input_ids":[1,5,7,0],"attention_mask":[1,1,0,0]}"#,
        ];
        let mut batcher = Batcher::new(3, Some(2), "d.jsonl").with_eos_id(Some(2));
        let mut batch = None;
        for (i, json) in rows.iter().enumerate() {
            batch = batcher.push(row(json, i + 1)).unwrap();
        }
        let batch = batch.expect("a batch of three rows");
        let shown = from_batch(&batch, &[0.0; 12], None, Unit::Line, 3);
        for (i, json) in rows.iter().enumerate() {
            let lint = from_row(&row(json, i + 1), Unit::Line, Some(2), Some(2), false);
            let lint: Vec<bool> = lint.tokens.iter().map(|c| c.padding).collect();
            let check: Vec<bool> = shown[i].tokens.iter().map(|c| c.padding).collect();
            assert_eq!(lint[..], check[..lint.len()], "row {}", i + 1);
            assert!(check[lint.len()..].iter().all(|&p| p));
        }
        let padding: Vec<bool> = shown[0].tokens.iter().map(|c| c.padding).collect();
        assert_eq!(padding, vec![false, false, false, true, true]);
    }
}
