//! A run captured on every rank (`check --captured-losses`): which formula the trainer's loss
//! computes across the ranks, what each rank's `num_items_in_batch` counted, and how the
//! formula weighs each trained token of an optimizer step.
//!
//! Every data-parallel stack (DDP, FSDP, DeepSpeed, accelerate) averages the ranks' gradients,
//! and a trainer sums its micro-batches' gradients within a rank. So a micro-batch whose loss is
//! its masked loss sum S divided by d weighs each of its tokens 1/(W·d), or 1/(W·K·d) where
//! the trainer divides each micro-batch's loss by the accumulation K too. The truth is 1/N for
//! every trained token of the step, N counted over every rank. The formulas differ in d:
//!
//! | formula | d | a token's weight |
//! |---|---|---|
//! | global token mean | N/W (divided by N, times W: transformers' `average_tokens_across_devices`) | 1/N |
//! | per-rank mean, averaged | N_r, the rank's own count | 1/(W·N_r) |
//! | divided by world size | N, with nothing undoing the ranks' averaging | 1/(W·N) |
//! | micro-batch mean, averaged | n, the micro-batch's own count, and the trainer divides by K | 1/(W·K·n) |
//!
//! Pure code: counts and sums in, figures out.

use std::collections::BTreeMap;

use serde::Serialize;

use super::steps::MISWEIGHT_TOLERANCE;

/// One captured micro-batch, from its recorded per-token losses.
#[derive(Debug, Clone, PartialEq)]
pub struct RankMicroBatch {
    pub rank: i64,
    pub step: i64,
    /// Trained targets.
    pub trained: u64,
    /// Σℓ over them.
    pub masked_loss_sum: f64,
    pub trainer_loss: Option<f64>,
    pub num_items: Option<f64>,
}

/// How a trainer's loss is normalised across ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RankFormula {
    GlobalTokenMean,
    PerRankMeanAveraged,
    DividedByWorldSize,
    MicroBatchMeanAveraged,
}

impl RankFormula {
    pub const ALL: [RankFormula; 4] = [
        RankFormula::GlobalTokenMean,
        RankFormula::PerRankMeanAveraged,
        RankFormula::DividedByWorldSize,
        RankFormula::MicroBatchMeanAveraged,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            RankFormula::GlobalTokenMean => "the global token mean (each micro-batch's loss sum divided by the step's count over every rank, times the world size)",
            RankFormula::PerRankMeanAveraged => "each rank's own token mean, averaged over the ranks",
            RankFormula::DividedByWorldSize => "the loss sum divided by the step's count over every rank, which the ranks' gradient averaging divides by the world size again",
            RankFormula::MicroBatchMeanAveraged => "each micro-batch's own token mean, divided by the accumulation and averaged over the ranks",
        }
    }
}

/// What one rank's `num_items_in_batch` counted in one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountKind {
    /// The step's trained targets over every rank.
    Global,
    /// The rank's own trained targets of the step.
    Rank,
    /// Neither.
    Other,
}

/// One rank in one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankStep {
    pub rank: i64,
    pub trained: u64,
    pub num_items: Option<f64>,
    pub counted: Option<CountKind>,
}

/// One optimizer step over every rank.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    pub step: i64,
    /// N: trained targets over every rank.
    pub trained: u64,
    pub ranks: Vec<RankStep>,
}

/// One rank over the capture.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankTotals {
    pub rank: i64,
    pub micro_batches: u64,
    pub trained: u64,
    /// Its masked token mean; null when nothing is trained.
    pub token_mean: Option<f64>,
}

/// The weights the trainer's formula gives the trained tokens, at its worst step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    pub worst_step: i64,
    /// The heaviest token against the truth's 1/N (after normalising the step to sum to 1).
    pub max_relative_weight: f64,
    /// Total-variation distance from the uniform 1/N.
    pub total_variation: f64,
    /// Σw over the step's tokens: 1 for the truth.
    pub total_weight: f64,
}

/// The cross-rank audit, for the report (`ranks`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RanksReport {
    pub world_size: usize,
    /// Micro-batches per rank and step (the most in any).
    pub accumulation: usize,
    pub ranks: Vec<RankTotals>,
    pub steps: Vec<Step>,
    /// Every formula the trainer's losses fit (several where the ranks' counts coincide).
    pub fitting: Vec<RankFormula>,
    /// The first of them: what the trainer computes; null when none fits or the capture has
    /// no trainer loss.
    pub formula: Option<RankFormula>,
    /// What that formula does to the steps' weights; null without a formula.
    pub weights: Option<Weights>,
    /// The model's losses against the recorded ones; null without a model.
    pub cross_check: Option<CrossCheck>,
}

/// A model's per-token losses on the captured batches against the recorded ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CrossCheck {
    pub batches: u64,
    /// Batches not compared: packed rows the model cannot keep apart (it would run them split).
    pub skipped: u64,
    pub max_difference: f64,
    /// Positions beyond the tolerance.
    pub positions_off: u64,
    pub first_off: Option<Off>,
}

/// A position whose model loss is not the recorded one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Off {
    pub rank: i64,
    /// The row's record number in its rank's file.
    pub row: usize,
    pub position: usize,
    pub recorded: f64,
    pub model: f64,
}

impl RanksReport {
    /// Whether the named formula weighs some step's tokens away from 1/N.
    pub fn misweights(&self) -> bool {
        self.weights.is_some_and(|w| {
            w.total_variation > MISWEIGHT_TOLERANCE
                || (w.total_weight - 1.0).abs() > MISWEIGHT_TOLERANCE
        })
    }
}

/// How far a trainer's loss may be from a formula's value: relative, for a fused or chunked
/// kernel that rounds differently from the recorded cross-entropy.
pub const FORMULA_RTOL: f64 = 1e-4;

/// The audit of `micro` (in any order) captured on `world_size` ranks.
pub fn audit(micro: &[RankMicroBatch], world_size: usize) -> RanksReport {
    let steps = steps(micro);
    let accumulation = per_rank_step(micro).values().copied().max().unwrap_or(1);
    let fitting: Vec<RankFormula> = RankFormula::ALL
        .into_iter()
        .filter(|&f| fits(f, micro, &steps, world_size))
        .collect();
    let formula = fitting.first().copied();
    let weights = formula.and_then(|f| worst_weights(f, micro, &steps, world_size, accumulation));
    RanksReport {
        world_size,
        accumulation,
        ranks: rank_totals(micro),
        steps: steps.into_values().collect(),
        fitting,
        formula,
        weights,
        cross_check: None,
    }
}

fn per_rank_step(micro: &[RankMicroBatch]) -> BTreeMap<(i64, i64), usize> {
    let mut counts = BTreeMap::new();
    for m in micro {
        *counts.entry((m.rank, m.step)).or_default() += 1;
    }
    counts
}

fn steps(micro: &[RankMicroBatch]) -> BTreeMap<i64, Step> {
    let mut steps: BTreeMap<i64, Step> = BTreeMap::new();
    for m in micro {
        let step = steps.entry(m.step).or_insert_with(|| Step {
            step: m.step,
            trained: 0,
            ranks: vec![],
        });
        step.trained = step.trained.saturating_add(m.trained);
        match step.ranks.iter_mut().find(|r| r.rank == m.rank) {
            Some(r) => {
                r.trained = r.trained.saturating_add(m.trained);
                r.num_items = r.num_items.or(m.num_items);
            }
            None => step.ranks.push(RankStep {
                rank: m.rank,
                trained: m.trained,
                num_items: m.num_items,
                counted: None,
            }),
        }
    }
    for step in steps.values_mut() {
        step.ranks.sort_by_key(|r| r.rank);
        let global = step.trained;
        for r in &mut step.ranks {
            r.counted = r.num_items.map(|items| {
                if items == global as f64 {
                    CountKind::Global
                } else if items == r.trained as f64 {
                    CountKind::Rank
                } else {
                    CountKind::Other
                }
            });
        }
    }
    steps
}

fn rank_totals(micro: &[RankMicroBatch]) -> Vec<RankTotals> {
    let mut ranks: BTreeMap<i64, (u64, u64, f64)> = BTreeMap::new();
    for m in micro {
        let e = ranks.entry(m.rank).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(m.trained);
        e.2 += m.masked_loss_sum;
    }
    ranks
        .into_iter()
        .map(|(rank, (micro_batches, trained, sum))| RankTotals {
            rank,
            micro_batches,
            trained,
            token_mean: (trained > 0).then(|| sum / trained as f64),
        })
        .collect()
}

/// The divisor of a micro-batch's loss sum under `formula`, before the ranks' averaging.
fn divisor(formula: RankFormula, m: &RankMicroBatch, step: &Step, world_size: usize) -> f64 {
    let rank = step
        .ranks
        .iter()
        .find(|r| r.rank == m.rank)
        .map_or(0, |r| r.trained);
    match formula {
        RankFormula::GlobalTokenMean => step.trained as f64 / world_size as f64,
        RankFormula::PerRankMeanAveraged => rank as f64,
        RankFormula::DividedByWorldSize => step.trained as f64,
        RankFormula::MicroBatchMeanAveraged => m.trained as f64,
    }
}

/// Whether every micro-batch's trainer loss is its loss sum over the formula's divisor.
fn fits(
    formula: RankFormula,
    micro: &[RankMicroBatch],
    steps: &BTreeMap<i64, Step>,
    world_size: usize,
) -> bool {
    let mut compared = 0;
    for m in micro.iter().filter(|m| m.trained > 0) {
        let Some(loss) = m.trainer_loss else {
            return false;
        };
        let want = m.masked_loss_sum / divisor(formula, m, &steps[&m.step], world_size);
        if (loss - want).abs() > FORMULA_RTOL * want.abs() + 1e-7 {
            return false;
        }
        compared += 1;
    }
    compared > 0
}

/// The formula's weights at the step furthest from uniform.
fn worst_weights(
    formula: RankFormula,
    micro: &[RankMicroBatch],
    steps: &BTreeMap<i64, Step>,
    world_size: usize,
    accumulation: usize,
) -> Option<Weights> {
    let per_micro = match formula {
        RankFormula::MicroBatchMeanAveraged => accumulation as f64,
        _ => 1.0,
    };
    let w = world_size as f64;
    steps
        .values()
        .filter(|s| s.trained > 0)
        .map(|step| {
            // (tokens, weight of each) per micro-batch of the step.
            let groups: Vec<(f64, f64)> = micro
                .iter()
                .filter(|m| m.step == step.step && m.trained > 0)
                .map(|m| {
                    let d = divisor(formula, m, step, world_size);
                    (m.trained as f64, 1.0 / (w * per_micro * d))
                })
                .collect();
            let n = step.trained as f64;
            let total: f64 = groups.iter().map(|(c, wt)| c * wt).sum();
            let heaviest = groups.iter().map(|g| g.1).fold(0.0, f64::max);
            let tv = groups
                .iter()
                .map(|(c, wt)| c * (wt / total - 1.0 / n).abs())
                .sum::<f64>()
                / 2.0;
            Weights {
                worst_step: step.step,
                max_relative_weight: heaviest / total * n,
                total_variation: tv,
                total_weight: total,
            }
        })
        .max_by(|a, b| {
            let off = |x: &Weights| x.total_variation + (x.total_weight - 1.0).abs();
            off(a).total_cmp(&off(b))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rank 0 trains `a` tokens, rank 1 `b`, one micro-batch each, every token's loss 2.
    fn two_ranks(a: u64, b: u64, loss: impl Fn(u64, u64) -> f64) -> Vec<RankMicroBatch> {
        [(0, a), (1, b)]
            .into_iter()
            .map(|(rank, n)| RankMicroBatch {
                rank,
                step: 0,
                trained: n,
                masked_loss_sum: 2.0 * n as f64,
                trainer_loss: Some(loss(n, a + b)),
                num_items: None,
            })
            .collect()
    }

    #[test]
    fn a_loss_times_the_world_size_over_the_global_count_is_the_truth() {
        let report = audit(
            &two_ranks(2, 8, |n, all| 2.0 * n as f64 * 2.0 / all as f64),
            2,
        );
        assert_eq!(report.formula, Some(RankFormula::GlobalTokenMean));
        assert!(!report.misweights(), "{report:?}");
        assert_eq!(report.ranks[1].trained, 8);
    }

    #[test]
    fn each_rank_dividing_by_its_own_count_weighs_the_small_rank_heavier() {
        let report = audit(&two_ranks(2, 8, |_, _| 2.0), 2);
        assert_eq!(report.formula, Some(RankFormula::PerRankMeanAveraged));
        let w = report.weights.unwrap();
        // Rank 0's tokens weigh 1/(2·2) against the truth's 1/10.
        assert!((w.max_relative_weight - 2.5).abs() < 1e-12, "{w:?}");
        assert!((w.total_weight - 1.0).abs() < 1e-12);
        assert!(report.misweights());
    }

    #[test]
    fn the_global_count_averaged_again_halves_the_step() {
        let report = audit(&two_ranks(2, 8, |n, all| 2.0 * n as f64 / all as f64), 2);
        assert_eq!(report.formula, Some(RankFormula::DividedByWorldSize));
        let w = report.weights.unwrap();
        assert!((w.total_weight - 0.5).abs() < 1e-12, "{w:?}");
        assert!(w.total_variation < 1e-12);
        assert!(report.misweights());
    }

    #[test]
    fn equal_counts_fit_both_means_and_misweight_nothing() {
        let report = audit(&two_ranks(5, 5, |_, _| 2.0), 2);
        assert_eq!(
            report.fitting,
            [
                RankFormula::GlobalTokenMean,
                RankFormula::PerRankMeanAveraged,
                RankFormula::MicroBatchMeanAveraged
            ]
        );
        assert!(!report.misweights());
    }

    #[test]
    fn counts_are_named_global_rank_or_neither() {
        let mut micro = two_ranks(2, 8, |_, _| 2.0);
        micro[0].num_items = Some(10.0);
        micro[1].num_items = Some(8.0);
        let report = audit(&micro, 2);
        let counted: Vec<_> = report.steps[0].ranks.iter().map(|r| r.counted).collect();
        assert_eq!(counted, [Some(CountKind::Global), Some(CountKind::Rank)]);
        micro[1].num_items = Some(9.0);
        assert_eq!(
            audit(&micro, 2).steps[0].ranks[1].counted,
            Some(CountKind::Other)
        );
    }
}
