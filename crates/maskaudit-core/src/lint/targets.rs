//! A row's geometry as the checks see it: its target slots after the shift, its padding
//! (`data::padding`, the definition `check` uses too), and where its packed documents start.

use crate::data::{documents, PaddingRule, PaddingSpan, Row};

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

/// The row's padding: leading and trailing (see [`crate::data::padding`]).
pub fn padding(row: &Row, pad_id: Option<i64>, eos_id: Option<i64>) -> PaddingSpan {
    PaddingRule::new(pad_id, eos_id).of_row(row)
}

/// Token indices where a packed row's documents start, the first excepted, inside the row's
/// content (see [`crate::data::documents::starts`]).
pub fn document_starts(row: &Row, span: PaddingSpan) -> Vec<usize> {
    documents::starts(row, span)
}

/// Whether a row is packed: several documents, or a field that says so.
pub fn is_packed(row: &Row, starts: &[usize]) -> bool {
    documents::is_packed(row, starts)
}
