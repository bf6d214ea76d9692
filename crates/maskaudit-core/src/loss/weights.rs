//! The gradient weight map: what weight the user's loss really gives each token.
//!
//! Any loss built linearly from per-token cross-entropies, L = Σ w[b,t]·ℓ[b,t] + (other terms),
//! has the gradient g = ∂L/∂z[b,t] = w[b,t]·d[b,t] + (other terms) at the logits z of position
//! t, where d = softmax(z) − onehot(input_ids[t+1]) is the cross-entropy's own gradient. So a
//! least-squares fit of g against d recovers each token's weight, and the residual
//! ‖g − w·d‖/‖g‖ is what is not next-token cross-entropy (label smoothing, a z-loss, wrong
//! targets, a leak through the logits). A correct token mean gives w = 1/Σm on trained targets
//! and 0 elsewhere; the founding bug gives every padding target a weight of its own. This
//! identifies any linear reduction from one batch, including ones no formula in
//! [`crate::loss::diagnosis`] names.
//!
//! The error model (docs/guide.md, "How close is close enough"). The user's loss runs in
//! float32, so each component of g carries a rounding error: g_j = w·p_j for j ≠ t is computed
//! as w·exp(log-softmax), good to a few units of float32 relative to itself, while
//! g_t = w·(p_t − 1) comes out of a cancellation, good only to a few units absolute. On a
//! confident model p_t rounds to 1 and g_t to 0 while 1 − p_t is not 0: the plain fit
//! ⟨g,d⟩/⟨d,d⟩ is then dominated by that lost component and recovers nonsense. So [`fit`]
//! keeps the plain fit (which a constant added to g, as a loss over `logits.mean()` adds,
//! cannot move: Σ d = 0) where the target's rounding is small against 1 − p_t, or where the
//! other components do not have cross-entropy's shape; otherwise it fits those components
//! alone, each good relative to itself. The residual is then
//! measured plainly and compared with [`residual_tolerance`], what rounding alone can leave
//! at that position.
//!
//!
//! Recovering the weights from a gradient needs libtorch: `maskaudit_torch::loss::weights`;
//! the rest is here.

use serde::Serialize;

use crate::loss::diagnosis::{Hypothesis, WeightEvidence};

/// Per-token weights and residuals of one batch, `[B, T-1]` row-major, aligned with the
/// targets (position t predicts token t+1).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenWeights {
    pub weights: Vec<f64>,
    pub residuals: Vec<f64>,
    /// The residual a correct float32 loss may reach at each position ([`residual_tolerance`]).
    pub tolerances: Vec<f64>,
    /// ‖g‖ at the last position of each row, which predicts nothing: a correct loss leaves
    /// it at 0. Summed over rows.
    pub last_position_norm: f64,
    /// Σ‖g‖ over every position, for scale.
    pub total_norm: f64,
}

/// Half a unit in the last place of a float32 number, relative: 2⁻²⁴.
pub const F32_UNIT: f64 = 5.960_464_477_539_063e-8;

/// How many roundings at the logits' magnitude a correct float32 log-softmax may be off by.
pub const ROUNDING_SAFETY: f64 = 8.0;

/// Lanes of the narrowest vector sum a float32 log-softmax is likely to take (AVX2's 8):
/// each lane adds V/8 exponentials one after the other.
pub const SUM_LANES: f64 = 8.0;

/// How far a correct float32 log-softmax (and so cross-entropy) of one position may be off,
/// absolutely: [`ROUNDING_SAFETY`] roundings of the subtraction z − lse at the logits'
/// magnitude, plus the drift of the sum of V exponentials inside lse, which libtorch's CPU
/// kernel adds V/8 at a time into f32 lanes. One of those lanes holds the maximum's term, 1,
/// and every term added to it is rounded at 1: up to V/8 roundings, 2·u·V/8, in the worst case
/// (seen: 1.4·10⁻⁴ at V = 32000). But the sum cannot lose more than its small part, e^ℓ − 1 ≈
/// ℓ, so the drift is at most twice the loss `loss` itself: on a confident model, whose losses
/// are far below that, the value of a formula says little, and the gradient's weights decide.
pub fn log_softmax_error(lse: f64, max_abs_logit: f64, vocab: usize, loss: f64) -> f64 {
    let rounding = ROUNDING_SAFETY * F32_UNIT * (1.0 + lse.abs() + max_abs_logit);
    let drift = 2.0 * (F32_UNIT * vocab as f64 / SUM_LANES).min(loss.abs());
    rounding + drift
}

/// The relative error of the target's component of the fit above which [`fit`] leaves it out:
/// an order below the weights' own [`MATCH_TOLERANCE`].
pub const TARGET_FIT_ERROR: f64 = 1e-4;

/// The relative residual of the fit over the components off the target below which they are
/// next-token cross-entropy's own shape (a correct loss leaves rounding there, about 10⁻⁶), and
/// may carry the fit alone.
pub const OFF_TARGET_SHAPE: f64 = 1e-2;

/// The fit's sums of one position, in f64: Σ g·p, Σ p² and Σ g² over the components off the
/// target, and the target's own g_t and d_t = p_t − 1.
#[derive(Debug, Clone, Copy)]
pub struct FitSums {
    pub off_gp: f64,
    pub off_pp: f64,
    pub off_gg: f64,
    pub g_t: f64,
    pub d_t: f64,
}

/// One position's weight, given `error` (its [`log_softmax_error`], which g_t carries as
/// w·error). The plain least-squares fit over every component, unless the
/// target's rounding exceeds [`TARGET_FIT_ERROR`] of d_t while the other components have
/// cross-entropy's shape ([`OFF_TARGET_SHAPE`]): then those alone. 0 where there is nothing
/// to fit.
pub fn fit(s: FitSums, error: f64) -> f64 {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 && (a / b).is_finite() {
            a / b
        } else {
            0.0
        }
    };
    let plain = ratio(s.off_gp + s.g_t * s.d_t, s.off_pp + s.d_t * s.d_t);
    let target_error = error / s.d_t.abs();
    if target_error <= TARGET_FIT_ERROR || s.off_pp <= 0.0 || s.off_gg <= 0.0 {
        return plain;
    }
    let off = ratio(s.off_gp, s.off_pp);
    let unexplained = (s.off_gg - off * s.off_gp).max(0.0) / s.off_gg;
    if unexplained.sqrt() <= OFF_TARGET_SHAPE {
        off
    } else {
        plain
    }
}

/// The residual ‖g − w·d‖/‖g‖ that rounding alone can leave at one position of a correct
/// float32 loss, given `error` (its [`log_softmax_error`]) and the fitted weight `w`: every
/// component of g (and of maskaudit's own d) is off by about error·p_j, the target's by error
/// absolute, so ‖g − w·d‖ may reach error·√(1 + Σp²)·|w|. Where the model is certain, ‖g‖ → 0
/// against that and the tolerance grows without bound instead of calling rounding a leak.
pub fn residual_tolerance(error: f64, sum_p2: f64, w: f64, g_norm: f64) -> f64 {
    let tolerance = error * (1.0 + sum_p2).sqrt() * w.abs() / g_norm;
    if tolerance.is_nan() {
        f64::INFINITY
    } else {
        tolerance
    }
}

/// A reduction the weights may follow, by the weight it gives one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalisation {
    TokenMean,
    AllPositionsMean,
    MaskedSumOverAllPositions,
    SequenceMean,
    Sum,
}

impl Normalisation {
    pub const ALL: [Normalisation; 5] = [
        Normalisation::TokenMean,
        Normalisation::AllPositionsMean,
        Normalisation::MaskedSumOverAllPositions,
        Normalisation::SequenceMean,
        Normalisation::Sum,
    ];

    /// The names of [`crate::loss::diagnosis`]'s formulas.
    pub fn name(self) -> &'static str {
        match self {
            Normalisation::TokenMean => "masked_token_mean",
            Normalisation::AllPositionsMean => "all_positions_mean",
            Normalisation::MaskedSumOverAllPositions => "masked_sum_over_all_positions",
            Normalisation::SequenceMean => "sequence_mean",
            Normalisation::Sum => "masked_sum",
        }
    }

    /// The analytic weights for a batch of `rows` rows with target mask `mask`.
    pub fn weights(self, mask: &[u8], rows: usize) -> Vec<f64> {
        let n = mask.len();
        let trained = mask.iter().filter(|&&m| m != 0).count() as f64;
        let m = |i: usize| f64::from(mask[i] != 0);
        match self {
            Normalisation::TokenMean => (0..n).map(|i| m(i) / trained.max(1.0)).collect(),
            Normalisation::AllPositionsMean => vec![1.0 / n.max(1) as f64; n],
            Normalisation::MaskedSumOverAllPositions => {
                (0..n).map(|i| m(i) / n.max(1) as f64).collect()
            }
            Normalisation::SequenceMean => {
                let per_row = n / rows.max(1);
                let counts: Vec<f64> = (0..rows)
                    .map(|r| (r * per_row..(r + 1) * per_row).map(m).sum())
                    .collect();
                let rows_trained = counts.iter().filter(|&&c| c > 0.0).count() as f64;
                (0..n)
                    .map(|i| {
                        let c = counts[i / per_row.max(1)];
                        if c > 0.0 {
                            m(i) / (c * rows_trained)
                        } else {
                            0.0
                        }
                    })
                    .collect()
            }
            Normalisation::Sum => (0..n).map(m).collect(),
        }
    }
}

/// Relative error below which recovered weights are taken to follow a normalisation: the
/// recovery is exact up to the gradient's rounding (f32 logits).
pub const MATCH_TOLERANCE: f64 = 1e-3;

/// What one batch's weights show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchGradient {
    /// First record of the batch.
    pub line: usize,
    /// Σ|w| over untrained targets / Σ|w|: the share of the gradient that trains what the
    /// mask excludes.
    pub untrained_share: f64,
    /// The part of it on padding targets (attention 0).
    pub padding_share: f64,
    /// max w / min w over trained targets (1 for a token mean).
    pub token_ratio: Option<f64>,
    /// The largest max/min of w within one row's trained targets.
    pub within_row_ratio: Option<f64>,
    /// The normalisation the weights follow, up to `scale`; null when none does.
    pub matched: Option<&'static str>,
    /// w / (the normalisation's weight): 1 for the formula itself.
    pub scale: Option<f64>,
    /// Every normalisation the weights fit, with its scale (several when this batch cannot
    /// tell them apart, e.g. equal rows make a sequence mean a token mean).
    pub fits: Vec<Fit>,
    /// The largest residual over positions with weight or gradient.
    pub max_residual: f64,
    /// The largest residual / [`residual_tolerance`] over positions: above 1, more than
    /// rounding.
    pub max_residual_excess: f64,
    /// ‖g‖ at last positions (which predict nothing) / Σ‖g‖.
    pub last_position_share: f64,
}

/// Analyses one batch's weights. `mask` is the target mask, `padding` 1 where the target is
/// padding (attention 0); both `[B, T-1]` like the weights.
pub fn analyse(
    w: &TokenWeights,
    mask: &[u8],
    padding: &[u8],
    rows: usize,
    line: usize,
) -> BatchGradient {
    let abs_total: f64 = w.weights.iter().map(|x| x.abs()).sum();
    let share = |pick: &dyn Fn(usize) -> bool| {
        if abs_total > 0.0 {
            (0..w.weights.len())
                .filter(|&i| pick(i))
                .map(|i| w.weights[i].abs())
                .sum::<f64>()
                / abs_total
        } else {
            0.0
        }
    };
    let untrained_share = share(&|i| mask[i] == 0);
    let padding_share = share(&|i| mask[i] == 0 && padding[i] != 0);
    let ratio = |idx: &mut dyn Iterator<Item = usize>| {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for i in idx {
            lo = lo.min(w.weights[i]);
            hi = hi.max(w.weights[i]);
        }
        (hi >= lo && lo > 0.0).then(|| hi / lo)
    };
    let n = w.weights.len();
    let token_ratio = ratio(&mut (0..n).filter(|&i| mask[i] != 0));
    let per_row = n / rows.max(1);
    let within_row_ratio = (0..rows)
        .filter_map(|r| ratio(&mut (r * per_row..(r + 1) * per_row).filter(|&i| mask[i] != 0)))
        .fold(None, |acc: Option<f64>, x| {
            Some(acc.map_or(x, |a| a.max(x)))
        });
    let (matched, scale) = match_normalisation(&w.weights, mask, rows);
    let fits = fits(&w.weights, mask, rows)
        .into_iter()
        .map(|(h, scale)| Fit {
            formula: h.name(),
            scale,
        })
        .collect();
    let max_residual = w.residuals.iter().copied().fold(0.0, f64::max);
    let max_residual_excess = w
        .residuals
        .iter()
        .zip(&w.tolerances)
        .map(|(r, t)| r / t)
        .fold(0.0, f64::max);
    BatchGradient {
        line,
        untrained_share,
        padding_share,
        token_ratio,
        within_row_ratio,
        matched: matched.map(|m| m.name()),
        scale,
        fits,
        max_residual,
        max_residual_excess,
        last_position_share: if w.total_norm > 0.0 {
            w.last_position_norm / w.total_norm
        } else {
            0.0
        },
    }
}

/// A normalisation the weights fit, and by what factor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Fit {
    pub formula: &'static str,
    pub scale: f64,
}

/// The normalisation whose weights, scaled, fit `w` within [`MATCH_TOLERANCE`]; among those,
/// the one whose scale is nearest 1 (a sum and a mean differ only in scale).
pub fn match_normalisation(
    w: &[f64],
    mask: &[u8],
    rows: usize,
) -> (Option<Normalisation>, Option<f64>) {
    let fits = fits(w, mask, rows);
    let best = fits
        .iter()
        .min_by(|a, b| a.1.ln().abs().total_cmp(&b.1.ln().abs()));
    (best.map(|b| b.0), best.map(|b| b.1))
}

/// Every normalisation that, scaled by a positive factor, fits `w` within
/// [`MATCH_TOLERANCE`].
pub fn fits(w: &[f64], mask: &[u8], rows: usize) -> Vec<(Normalisation, f64)> {
    let norm_w: f64 = w.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut out = vec![];
    if norm_w == 0.0 {
        return out;
    }
    for h in Normalisation::ALL {
        let hw = h.weights(mask, rows);
        let hh: f64 = hw.iter().map(|x| x * x).sum();
        if hh == 0.0 {
            continue;
        }
        let c = w.iter().zip(&hw).map(|(a, b)| a * b).sum::<f64>() / hh;
        let err = w
            .iter()
            .zip(&hw)
            .map(|(a, b)| (a - c * b).powi(2))
            .sum::<f64>()
            .sqrt()
            / norm_w;
        if err <= MATCH_TOLERANCE && c > 0.0 {
            out.push((h, c));
        }
    }
    out
}

/// The weights of every weighed batch as evidence of the formula a loss computes: a formula
/// is followed when every batch's weights fit it at the scale the value was compared at
/// (`scales`, one a batch; NaN for a batch with nothing trained, which is skipped).
pub struct Evidence<'a> {
    pub batches: &'a [BatchGradient],
    pub scales: &'a [f64],
}

impl WeightEvidence for Evidence<'_> {
    fn follows(&self, h: Hypothesis) -> Option<bool> {
        let normalisation = Normalisation::ALL
            .into_iter()
            .find(|n| n.name() == h.name())?;
        let weighed: Vec<(&BatchGradient, f64)> = self
            .batches
            .iter()
            .zip(self.scales.iter().copied())
            // A batch whose weights fit no normalisation at all (a certain model's gradient
            // rounded away) says nothing either way.
            .filter(|(b, scale)| scale.is_finite() && !b.fits.is_empty())
            .collect();
        if weighed.is_empty() || self.batches.len() != self.scales.len() {
            return None;
        }
        Some(weighed.iter().all(|(b, scale)| {
            b.fits.iter().any(|f| {
                f.formula == normalisation.name()
                    && (f.scale / scale - 1.0).abs() <= MATCH_TOLERANCE
            })
        }))
    }
}

/// Over all the batches the weight map ran on.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GradientSummary {
    pub batches: Vec<BatchGradient>,
    /// The normalisation every batch fits with the same scale (the scale nearest 1 when
    /// several do), or null.
    pub matched: Option<&'static str>,
    pub scale: Option<f64>,
    /// The largest untrained share of any batch.
    pub max_untrained_share: f64,
    pub max_padding_share: f64,
    pub max_residual: f64,
    /// The largest residual / tolerance of any position ([`BatchGradient::max_residual_excess`]).
    pub max_residual_excess: f64,
    /// Why there is no weight map, when there is none.
    pub note: String,
}

impl GradientSummary {
    pub fn of(batches: Vec<BatchGradient>, note: String) -> Self {
        let same = |a: f64, b: f64| (a - b).abs() <= MATCH_TOLERANCE * a.abs().max(b.abs());
        let common = batches.first().map_or(vec![], |first| {
            first
                .fits
                .iter()
                .filter(|f| {
                    batches.iter().all(|b| {
                        b.fits
                            .iter()
                            .any(|g| g.formula == f.formula && same(g.scale, f.scale))
                    })
                })
                .copied()
                .collect::<Vec<Fit>>()
        });
        let best = common
            .iter()
            .min_by(|a, b| a.scale.ln().abs().total_cmp(&b.scale.ln().abs()));
        let max = |f: fn(&BatchGradient) -> f64| batches.iter().map(f).fold(0.0, f64::max);
        Self {
            matched: best.map(|f| f.formula),
            scale: best.map(|f| f.scale),
            max_untrained_share: max(|b| b.untrained_share),
            max_padding_share: max(|b| b.padding_share),
            max_residual: max(|b| b.max_residual),
            max_residual_excess: max(|b| b.max_residual_excess),
            batches,
            note,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tw(weights: Vec<f64>) -> TokenWeights {
        let n = weights.len();
        TokenWeights {
            weights,
            residuals: vec![0.0; n],
            tolerances: vec![1.0; n],
            last_position_norm: 0.0,
            total_norm: 1.0,
        }
    }

    #[test]
    fn each_normalisation_is_recognised_from_its_own_weights() {
        // Two rows of four targets; row 1 has one trained target, row 0 three.
        let mask = [1, 1, 1, 0, 0, 1, 0, 0];
        for h in Normalisation::ALL {
            let (got, scale) = match_normalisation(&h.weights(&mask, 2), &mask, 2);
            assert_eq!(got, Some(h), "{h:?}");
            assert!((scale.unwrap() - 1.0).abs() < 1e-12);
        }
        let scaled: Vec<f64> = Normalisation::TokenMean
            .weights(&mask, 2)
            .iter()
            .map(|w| 1.37 * w)
            .collect();
        let (got, scale) = match_normalisation(&scaled, &mask, 2);
        assert_eq!(got, Some(Normalisation::TokenMean));
        assert!((scale.unwrap() - 1.37).abs() < 1e-12);
    }

    #[test]
    fn shares_and_ratios_follow_the_weights() {
        let mask = [1, 1, 1, 0, 0, 1, 0, 0];
        let padding = [0, 0, 0, 1, 0, 0, 1, 1];
        // All positions: every target weighs 1/8, so 4/8 of the gradient is untrained.
        let g = analyse(
            &tw(Normalisation::AllPositionsMean.weights(&mask, 2)),
            &mask,
            &padding,
            2,
            1,
        );
        assert!((g.untrained_share - 4.0 / 8.0).abs() < 1e-12);
        assert!((g.padding_share - 3.0 / 8.0).abs() < 1e-12);
        assert_eq!(g.matched, Some("all_positions_mean"));
        // Sequence mean: 1/6 in row 0, 1/2 in row 1: uniform within rows, 3× across.
        let g = analyse(
            &tw(Normalisation::SequenceMean.weights(&mask, 2)),
            &mask,
            &padding,
            2,
            1,
        );
        assert!((g.token_ratio.unwrap() - 3.0).abs() < 1e-12);
        assert!((g.within_row_ratio.unwrap() - 1.0).abs() < 1e-12);
        assert_eq!(g.untrained_share, 0.0);
    }
}
