//! Aggregating per-token losses, with and without the mask.
//!
//! Pure functions over slices: `losses` are next-token cross-entropies with reduction 'none',
//! row-major `rows × positions`, and `mask` is aligned with the targets (1 = trained). Sums
//! are kept in f64 so that millions of f32 terms do not lose precision.
//!
//! The aggregates are those of the README's table: the masked token mean Σℓm/Σm is the correct
//! value; the others are what common bugs compute instead. Counts saturate rather than wrap.
#![warn(clippy::arithmetic_side_effects)]

use serde::Serialize;

use crate::data::batch::TargetCounts;

/// Sums of one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchSums {
    pub positions: u64,
    pub trained: u64,
    pub loss_sum: f64,
    pub masked_loss_sum: f64,
    /// Σ over rows with trained targets of that row's masked mean.
    pub row_mean_sum: f64,
    /// Rows with at least one trained target.
    pub rows_trained: u64,
}

impl BatchSums {
    /// Sums one batch. `losses.len() == mask.len() == rows * positions_per_row`.
    pub fn of(losses: &[f32], mask: &[u8], rows: usize) -> Self {
        assert_eq!(losses.len(), mask.len(), "losses and mask are aligned");
        let per_row = losses.len().checked_div(rows).unwrap_or(0).max(1);
        let mut sums = BatchSums {
            positions: losses.len() as u64,
            ..Default::default()
        };
        for (l, m) in losses.chunks(per_row).zip(mask.chunks(per_row)).take(rows) {
            let (mut row_sum, mut row_masked, mut row_trained) = (0f64, 0f64, 0u64);
            for (&loss, &keep) in l.iter().zip(m) {
                let loss = f64::from(loss);
                row_sum += loss;
                if keep != 0 {
                    row_masked += loss;
                    row_trained = row_trained.saturating_add(1);
                }
            }
            sums.loss_sum += row_sum;
            sums.masked_loss_sum += row_masked;
            sums.trained = sums.trained.saturating_add(row_trained);
            if row_trained > 0 {
                sums.row_mean_sum += row_masked / row_trained as f64;
                sums.rows_trained = sums.rows_trained.saturating_add(1);
            }
        }
        sums
    }

    /// Σℓm / Σm for this batch, if anything is trained.
    pub fn masked_token_mean(&self) -> Option<f64> {
        (self.trained > 0).then(|| self.masked_loss_sum / self.trained as f64)
    }
}

/// Running totals over the whole dataset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LossTotals {
    pub rows: u64,
    pub batches: u64,
    pub positions: u64,
    pub trained: u64,
    /// How the targets divide into padding and real tokens, trained or not.
    pub targets: TargetCounts,
    /// Σℓ over the padding targets the mask leaves untrained.
    untrained_padding_loss_sum: f64,
    loss_sum: f64,
    masked_loss_sum: f64,
    row_mean_sum: f64,
    rows_trained: u64,
    batch_mean_sum: f64,
    batches_trained: u64,
}

/// The aggregates; `None` where nothing is trained.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Aggregates {
    /// Σℓ / N over every position, padding included.
    pub all_positions_mean: Option<f64>,
    /// Σℓm / Σm: the correct token mean.
    pub masked_token_mean: Option<f64>,
    /// Σℓm / N: the mask in the numerator only.
    pub masked_sum_over_all_positions: Option<f64>,
    /// Mean over rows with trained targets of the row's Σℓm / Σm.
    pub sequence_mean: Option<f64>,
    /// Mean over batches with trained targets of the batch's Σℓm / Σm.
    pub batch_mean_of_means: Option<f64>,
    /// Σℓ over trained and padding targets / their number: the masked mean with padding left
    /// unmasked, prompts still masked. Equal to the masked token mean without padding.
    pub trained_and_padding_mean: Option<f64>,
}

impl LossTotals {
    pub fn add(&mut self, rows: usize, sums: &BatchSums) {
        self.rows = self.rows.saturating_add(rows as u64);
        self.batches = self.batches.saturating_add(1);
        self.positions = self.positions.saturating_add(sums.positions);
        self.trained = self.trained.saturating_add(sums.trained);
        self.loss_sum += sums.loss_sum;
        self.masked_loss_sum += sums.masked_loss_sum;
        self.row_mean_sum += sums.row_mean_sum;
        self.rows_trained = self.rows_trained.saturating_add(sums.rows_trained);
        if let Some(mean) = sums.masked_token_mean() {
            self.batch_mean_sum += mean;
            self.batches_trained = self.batches_trained.saturating_add(1);
        }
    }

    /// Adds a batch of per-token losses; `mask` and `padding` (1 where the target is padding)
    /// are aligned with them.
    pub fn add_batch(
        &mut self,
        losses: &[f32],
        mask: &[u8],
        padding: &[u8],
        rows: usize,
    ) -> BatchSums {
        assert_eq!(mask.len(), padding.len(), "mask and padding are aligned");
        let sums = BatchSums::of(losses, mask, rows);
        self.add(rows, &sums);
        self.targets.add(&TargetCounts::of(mask, padding));
        self.untrained_padding_loss_sum += losses
            .iter()
            .zip(mask.iter().zip(padding))
            .filter(|(_, (&m, &p))| m == 0 && p != 0)
            .map(|(&l, _)| f64::from(l))
            .sum::<f64>();
        sums
    }

    /// Padding targets / all targets: the share of positions a loss that does not mask
    /// padding takes in besides the real tokens.
    pub fn padding_fraction(&self) -> Option<f64> {
        (self.positions > 0).then(|| self.targets.padding as f64 / self.positions as f64)
    }

    pub fn aggregates(&self) -> Aggregates {
        let div = |num: f64, den: u64| (den > 0).then(|| num / den as f64);
        let any_trained = self.trained > 0;
        let untrained_padding = self
            .targets
            .padding
            .saturating_sub(self.targets.padding_trained);
        Aggregates {
            all_positions_mean: div(self.loss_sum, self.positions).filter(|_| any_trained),
            masked_token_mean: div(self.masked_loss_sum, self.trained),
            masked_sum_over_all_positions: div(self.masked_loss_sum, self.positions)
                .filter(|_| any_trained),
            sequence_mean: div(self.row_mean_sum, self.rows_trained),
            batch_mean_of_means: div(self.batch_mean_sum, self.batches_trained),
            trained_and_padding_mean: div(
                self.masked_loss_sum + self.untrained_padding_loss_sum,
                self.trained.saturating_add(untrained_padding),
            )
            .filter(|_| any_trained),
        }
    }

    /// What padding does to a loss that leaves it unmasked; `None` without padding targets.
    pub fn contamination(&self) -> Option<Contamination> {
        if self.targets.padding == 0 {
            return None;
        }
        Contamination::of(&self.aggregates())
    }
}

/// How far a loss that takes padding in sits from the correct one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Contamination {
    /// trained_and_padding_mean − masked_token_mean.
    pub absolute: f64,
    /// absolute / masked_token_mean.
    pub relative: f64,
}

impl Contamination {
    pub fn of(aggregates: &Aggregates) -> Option<Self> {
        let all = aggregates.trained_and_padding_mean?;
        let masked = aggregates.masked_token_mean?;
        let absolute = all - masked;
        Some(Self {
            absolute,
            relative: relative_change(all, masked),
        })
    }
}

/// The signed relative change of a scalar from its reference: (value − reference) /
/// |reference|, 0 when both are 0. (A tensor's largest relative difference from another is
/// `maskaudit_torch::model::max_relative_difference`.)
pub fn relative_change(value: f64, reference: f64) -> f64 {
    if value == reference {
        0.0
    } else {
        (value - reference) / reference.abs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: Option<f64>, b: f64) {
        let a = a.expect("value present");
        assert!((a - b).abs() < 1e-12, "{a} != {b}");
    }

    #[test]
    fn aggregates_match_hand_computation() {
        // Batch 1: two rows of 3 positions.
        let mut totals = LossTotals::default();
        // Padding: the last target of row 1, the last two of row 2.
        totals.add_batch(
            &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            &[1, 1, 0, 1, 0, 0],
            &[0, 0, 1, 0, 1, 1],
            2,
        );
        // Batch 2: one row of 2 positions, its first a prompt.
        totals.add_batch(&[10.0, 20.0], &[0, 1], &[0, 0], 1);
        let a = totals.aggregates();
        close(a.all_positions_mean, 51.0 / 8.0);
        close(a.masked_token_mean, (1.0 + 2.0 + 4.0 + 20.0) / 4.0);
        close(a.masked_sum_over_all_positions, 27.0 / 8.0);
        close(a.sequence_mean, (1.5 + 4.0 + 20.0) / 3.0);
        close(a.batch_mean_of_means, ((7.0 / 3.0) + 20.0) / 2.0);
        close(a.trained_and_padding_mean, (27.0 + 3.0 + 5.0 + 6.0) / 7.0);
        close(totals.padding_fraction(), 3.0 / 8.0);
        let c = totals.contamination().unwrap();
        close(Some(c.absolute), 41.0 / 7.0 - 27.0 / 4.0);
        assert_eq!(
            totals.targets,
            TargetCounts {
                positions: 8,
                trained: 4,
                padding: 3,
                padding_trained: 0,
                untrained_real: 1
            }
        );
        assert_eq!(
            (
                totals.rows,
                totals.batches,
                totals.positions,
                totals.trained
            ),
            (3, 2, 8, 4)
        );
    }

    #[test]
    fn untrained_rows_and_batches_are_left_out_of_the_means() {
        let mut totals = LossTotals::default();
        totals.add_batch(&[1.0, 1.0, 9.0, 9.0], &[1, 1, 0, 0], &[0; 4], 2);
        totals.add_batch(&[5.0, 5.0], &[0, 0], &[0, 0], 1);
        let a = totals.aggregates();
        close(a.sequence_mean, 1.0);
        close(a.batch_mean_of_means, 1.0);
        close(a.masked_token_mean, 1.0);
    }

    #[test]
    fn nothing_trained_gives_no_aggregates() {
        let mut totals = LossTotals::default();
        totals.add_batch(&[1.0, 2.0], &[0, 0], &[1, 1], 1);
        let a = totals.aggregates();
        assert_eq!(a.masked_token_mean, None);
        assert_eq!(totals.contamination(), None);
        assert_eq!(a.all_positions_mean, None);
        assert_eq!(Contamination::of(&a), None);
    }

    #[test]
    fn contamination_is_signed() {
        let mut totals = LossTotals::default();
        totals.add_batch(&[2.0, 0.0], &[1, 0], &[0, 1], 1);
        let c = totals.contamination().unwrap();
        assert_eq!(c.absolute, -1.0);
        assert_eq!(c.relative, -0.5);
    }

    #[test]
    fn contamination_is_over_padding_not_prompts() {
        // A prompt (untrained, real) and no padding: nothing to contaminate.
        let mut totals = LossTotals::default();
        totals.add_batch(&[9.0, 1.0], &[0, 1], &[0, 0], 1);
        assert_eq!(totals.contamination(), None);
        assert_eq!(totals.padding_fraction(), Some(0.0));
        // Padding the mask trains: counted once, as padding, and nothing wraps.
        let mut totals = LossTotals::default();
        totals.add_batch(&[1.0, 3.0, 5.0], &[1, 1, 1], &[0, 1, 1], 1);
        assert_eq!(
            (
                totals.targets.padding,
                totals.targets.padding_trained,
                totals.targets.untrained_real
            ),
            (2, 2, 0)
        );
        let c = totals.contamination().unwrap();
        assert_eq!(c.absolute, 0.0);
    }
}
