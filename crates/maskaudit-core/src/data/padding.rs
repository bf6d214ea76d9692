//! What padding is: one definition for `lint`, `check`, the batcher, the JSON and the HTML.
//!
//! A row's padding is, in this order:
//! 1. with an `attention_mask` in the row, its trailing run of 0s, and its leading run of 0s
//!    (left padding) before the first 1;
//! 2. else, with a pad id, the trailing run of pad ids, less its first token when the pad id
//!    is the EOS id (that one is the row's EOS); a row without such a run may be left-padded:
//!    its leading run of pad ids, when a token other than the pad id follows it, less the
//!    run's last token when the pad id is the EOS id (it may be a BOS equal to the EOS, as
//!    GPT-2's `<|endoftext|>`). A leading run is only taken when the row has no trailing one,
//!    because a real token equal to the pad id at the start of a right-padded row is far more
//!    likely than a row padded on both sides;
//! 3. else nothing of the row; the columns the batcher appends to reach the batch's longest
//!    row are padding whatever the row says.
//!
//! Padding is a classification of positions for counting and reporting; it does not change the
//! attention mask the model is given.
#![warn(clippy::arithmetic_side_effects)]

use crate::data::Row;

/// Where a row's padding is: tokens before `start` and from `end` on; the content is
/// `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaddingSpan {
    /// Tokens of left padding (the content's first index).
    pub start: usize,
    /// Where the trailing padding starts (the row's length without any).
    pub end: usize,
}

impl PaddingSpan {
    /// No padding in a row of `len` tokens.
    pub fn none(len: usize) -> Self {
        Self { start: 0, end: len }
    }

    /// Whether token `index` is padding.
    pub fn contains(&self, index: usize) -> bool {
        index < self.start || index >= self.end
    }

    /// Tokens of the content, padding excluded.
    pub fn content_len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Padding tokens of a row of `len` tokens.
    pub fn tokens(&self, len: usize) -> usize {
        len.saturating_sub(self.content_len())
    }

    /// Whether the row is left-padded.
    pub fn is_left(&self) -> bool {
        self.start > 0
    }
}

/// How padding is told in rows: the pad and EOS ids given on the command line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PaddingRule {
    pub pad_id: Option<i64>,
    pub eos_id: Option<i64>,
}

impl PaddingRule {
    pub fn new(pad_id: Option<i64>, eos_id: Option<i64>) -> Self {
        Self { pad_id, eos_id }
    }

    /// A validated row's padding (see the module documentation).
    pub fn of_row(&self, row: &Row) -> PaddingSpan {
        self.of(&row.input_ids, row.given_attention_mask())
    }

    /// The padding of a row's ids and, when the row has one, its attention mask.
    pub fn of(&self, ids: &[i64], attention: Option<&[u8]>) -> PaddingSpan {
        let len = ids.len();
        if let Some(attention) = attention {
            let end = attention.iter().rposition(|&a| a != 0).map_or(0, |i| {
                // rposition returns an index below the length.
                i.saturating_add(1)
            });
            let start = attention[..end].iter().take_while(|&&a| a == 0).count();
            return PaddingSpan { start, end };
        }
        let Some(pad) = self.pad_id else {
            return PaddingSpan::none(len);
        };
        let pad_is_eos = self.eos_id == Some(pad);
        let less_eos = |run: usize| {
            if pad_is_eos {
                run.saturating_sub(1)
            } else {
                run
            }
        };
        let trailing = less_eos(ids.iter().rev().take_while(|&&t| t == pad).count());
        if trailing > 0 {
            return PaddingSpan {
                start: 0,
                end: len.saturating_sub(trailing),
            };
        }
        let leading = ids.iter().take_while(|&&t| t == pad).count();
        if leading < len {
            PaddingSpan {
                start: less_eos(leading),
                end: len,
            }
        } else {
            PaddingSpan::none(len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(rule: PaddingRule, ids: &[i64], attention: Option<&[u8]>) -> (usize, usize) {
        let s = rule.of(ids, attention);
        (s.start, s.end)
    }

    #[test]
    fn the_attention_mask_decides_when_the_row_has_one() {
        let rule = PaddingRule::new(Some(0), None);
        assert_eq!(span(rule, &[1, 5, 0, 0], Some(&[1, 1, 0, 0])), (0, 2));
        // Left padding, and pad ids the mask attends to are real tokens.
        assert_eq!(span(rule, &[0, 0, 5, 0], Some(&[0, 0, 1, 1])), (2, 4));
        // A hole in the middle is not padding.
        assert_eq!(span(rule, &[1, 5, 6, 7], Some(&[1, 0, 1, 1])), (0, 4));
        // All zeros: all padding, counted once.
        let s = rule.of(&[1, 2], Some(&[0, 0]));
        assert_eq!((s.start, s.end, s.tokens(2)), (0, 0, 2));
        assert!(s.contains(0) && s.contains(1));
    }

    #[test]
    fn a_trailing_pad_run_keeps_the_eos_when_pad_is_eos() {
        assert_eq!(
            span(PaddingRule::new(Some(0), None), &[1, 5, 0, 0], None),
            (0, 2)
        );
        let eos = PaddingRule::new(Some(2), Some(2));
        assert_eq!(span(eos, &[1, 5, 2, 2, 2], None), (0, 3));
        assert_eq!(span(eos, &[1, 5, 2], None), (0, 3));
        // Without a pad id nothing of the row is padding.
        assert_eq!(span(PaddingRule::default(), &[1, 5, 0, 0], None), (0, 4));
    }

    #[test]
    fn a_leading_pad_run_is_left_padding_only_without_a_trailing_one() {
        let rule = PaddingRule::new(Some(0), None);
        assert_eq!(span(rule, &[0, 0, 5, 6], None), (2, 4));
        // Padded on the right: a leading pad id is a real token.
        assert_eq!(span(rule, &[0, 5, 6, 0], None), (0, 3));
        // All pad ids: trailing padding.
        assert_eq!(span(rule, &[0, 0, 0], None), (0, 0));
        // pad == eos: the run's last token may be a BOS equal to the EOS.
        let eos = PaddingRule::new(Some(2), Some(2));
        assert_eq!(span(eos, &[2, 2, 2, 5, 6, 2], None), (2, 6));
        assert_eq!(span(eos, &[2, 5, 6, 2], None), (0, 4));
    }
}
