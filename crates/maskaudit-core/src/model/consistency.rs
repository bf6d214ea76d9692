//! The trace-consistency probe: does the model give a real token the same logits however the
//! batch around it is shaped?
//!
//! For a causal model with right padding, the logits at real positions must not move when
//! padding columns are appended, nor when a row runs alone instead of in its batch. A trace
//! that baked in the example's shape, a model that derives position ids from the attention
//! mask, or rotary embeddings rescaled by length (dynamic RoPE) break this, and every loss
//! maskaudit computes from such a model is wrong without a sign. The probe makes two one-row
//! calls on the first batch: its shortest row alone with padding appended, and its longest
//! row alone, a fraction of one batch's cost.
//!
//! The probe itself runs the model: `maskaudit_torch::model::consistency`.

use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Consistency {
    /// False with `--no-model-probe`, or when no batch had two tokens.
    pub ran: bool,
    /// Rows of the first batch the probe ran alone: the shortest (padded) and the longest.
    pub rows_alone: usize,
    /// The longest sequence the model was called with (the padded batch).
    pub longest_length: i64,
    /// Largest relative change of a real position's logits when padding was appended.
    pub padding_difference: Option<f64>,
    /// Largest relative change of a real position's logits when its row ran alone.
    pub row_difference: Option<f64>,
    /// Relative change above which the model fails (by the logits' dtype).
    pub tolerance: f64,
    /// What was skipped or failed, in words; empty when all ran.
    pub note: String,
}

impl Consistency {
    /// The probe did not get to compare anything, for the reason given.
    pub fn not_checked(tolerance: f64, why: String) -> Self {
        Self {
            ran: true,
            tolerance,
            note: why,
            ..Default::default()
        }
    }

    /// Whether any logits were compared: a probe that ran but compared nothing (every call
    /// skipped or out of memory) checked nothing.
    pub fn compared(&self) -> bool {
        self.ran && (self.padding_difference.is_some() || self.row_difference.is_some())
    }

    pub fn passed(&self) -> bool {
        let ok = |d: Option<f64>| d.is_none_or(|d| d <= self.tolerance);
        ok(self.padding_difference) && ok(self.row_difference)
    }
}
