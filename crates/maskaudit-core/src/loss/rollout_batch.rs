//! Rollout rows to padded batches, each target marked trained, masked or padding (pure: no
//! tensors; `loss::policy` uploads them).

use crate::data::rollout::{Advantages, RolloutRow};
use crate::loss::policy_aggregation::TargetKind;

/// Rows right-padded to one width T; per-target vectors are `[rows, T-1]`, entry p belonging
/// to the token at p+1.
#[derive(Debug, Clone)]
pub struct RolloutBatch {
    pub lines: Vec<usize>,
    pub rows: usize,
    pub width: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    /// The response mask over the targets, as the loss gets it.
    pub mask: Vec<f32>,
    pub kinds: Vec<TargetKind>,
    /// `[rows]` when every row has one advantage, else `[rows, T-1]` (a row's single value
    /// repeated; 0 on appended padding).
    pub advantages: AdvantageValues,
    /// Per target, as the row gives them (`null` read as NaN); `old_given` is false where the
    /// row gives none (no field, or appended padding): the current log-prob stands in there.
    pub old_logprobs: Vec<f64>,
    pub old_given: Vec<bool>,
    pub ref_logprobs: Vec<f64>,
    pub ref_given: Vec<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AdvantageValues {
    Row(Vec<f64>),
    Token(Vec<f64>),
}

impl RolloutBatch {
    pub fn targets(&self) -> usize {
        self.width - 1
    }

    /// Response tokens the mask trains.
    pub fn trained(&self) -> u64 {
        self.mask.iter().filter(|&&m| m != 0.0).count() as u64
    }
}

/// The rows padded with `pad_id` to `width` (at least the longest row).
pub fn batch(rows: &[RolloutRow], pad_id: i64, width: usize) -> RolloutBatch {
    let width = rows
        .iter()
        .map(|r| r.input_ids.len())
        .max()
        .unwrap_or(2)
        .max(width);
    let t = width - 1;
    let per_token = rows
        .iter()
        .any(|r| matches!(r.advantages, Some(Advantages::Token(_))));
    let mut b = RolloutBatch {
        lines: rows.iter().map(|r| r.line).collect(),
        rows: rows.len(),
        width,
        input_ids: Vec::with_capacity(rows.len() * width),
        attention_mask: Vec::with_capacity(rows.len() * width),
        mask: Vec::with_capacity(rows.len() * t),
        kinds: Vec::with_capacity(rows.len() * t),
        advantages: AdvantageValues::Row(vec![]),
        old_logprobs: Vec::with_capacity(rows.len() * t),
        old_given: Vec::with_capacity(rows.len() * t),
        ref_logprobs: Vec::with_capacity(rows.len() * t),
        ref_given: Vec::with_capacity(rows.len() * t),
    };
    let (mut row_adv, mut token_adv) = (vec![], vec![]);
    for r in rows {
        let len = r.input_ids.len();
        b.input_ids.extend(&r.input_ids);
        b.input_ids.extend(std::iter::repeat_n(pad_id, width - len));
        b.attention_mask
            .extend(r.attention_mask.iter().map(|&a| i64::from(a)));
        b.attention_mask.extend(std::iter::repeat_n(0, width - len));
        let row_value = match &r.advantages {
            Some(Advantages::Row(a)) => *a,
            _ => 0.0,
        };
        row_adv.push(row_value);
        for p in 0..t {
            let at = p + 1;
            let inside = at < len;
            let trained = inside && r.mask[at] != 0;
            b.mask.push(if trained { 1.0 } else { 0.0 });
            b.kinds.push(if trained {
                TargetKind::Trained
            } else if !inside || r.attention_mask[at] == 0 {
                TargetKind::Padding
            } else {
                TargetKind::Masked
            });
            let value = |v: &Option<Vec<f64>>| match v {
                Some(v) if inside => v[at],
                _ => f64::NAN,
            };
            b.old_logprobs.push(value(&r.old_logprobs));
            b.ref_logprobs.push(value(&r.ref_logprobs));
            b.old_given.push(inside && r.old_logprobs.is_some());
            b.ref_given.push(inside && r.ref_logprobs.is_some());
            token_adv.push(match &r.advantages {
                Some(Advantages::Token(a)) if inside => a[at],
                Some(Advantages::Row(a)) if inside => *a,
                _ => 0.0,
            });
        }
    }
    b.advantages = if per_token {
        AdvantageValues::Token(token_adv)
    } else {
        AdvantageValues::Row(row_adv)
    };
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(line: usize, ids: &[i64], mask: &[u8], adv: Advantages) -> RolloutRow {
        RolloutRow {
            line,
            input_ids: ids.to_vec(),
            mask: mask.to_vec(),
            attention_mask: vec![1; ids.len()],
            advantages: Some(adv),
            old_logprobs: None,
            ref_logprobs: None,
        }
    }

    #[test]
    fn targets_are_trained_masked_or_padding() {
        let rows = [
            row(1, &[5, 6, 7, 8], &[0, 1, 0, 1], Advantages::Row(2.0)),
            row(2, &[5, 6], &[0, 1], Advantages::Token(vec![0.0, 3.0])),
        ];
        let b = batch(&rows, 0, 0);
        assert_eq!(b.width, 4);
        assert_eq!(b.mask, vec![1.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        use TargetKind::*;
        assert_eq!(
            b.kinds,
            vec![Trained, Masked, Trained, Trained, Padding, Padding]
        );
        assert_eq!(b.input_ids[4..], [5, 6, 0, 0]);
        assert_eq!(
            b.advantages,
            AdvantageValues::Token(vec![2.0, 2.0, 2.0, 3.0, 0.0, 0.0])
        );
        assert_eq!(b.trained(), 3);
        assert_eq!(batch(&rows[..1], 0, 6).width, 6);
    }
}
