//! The training step, not just the batch: how an optimizer step weighs each token.
//!
//! A trainer runs W ranks × K micro-batches per optimizer step (gradient accumulation and data
//! parallelism), and how it normalises across them decides each token's weight in the step's
//! gradient. The bugs live there and are invisible in any one batch: a mean of micro-batch
//! means (transformers PR 34191, trl issue 2175), micro-batch means not divided by K
//! (transformers issue 37197: loss 8-10 instead of 1), each rank dividing by its own token
//! count (`average_tokens_across_devices`), the last partial window divided by the full K
//! (Lightning issue 19987, minimind issue 749). The truth is the global token mean: every
//! trained token of the step weighs 1/N.
//!
//! Micro-batches are the file-order batches of `check`; a step takes the next W×K of them,
//! micro-batch i of a step going to rank i mod W; the last step may be partial (dropped with
//! `--drop-last`). Pure code: counts and weights in, figures out.

use serde::Serialize;

/// `--accum K --world-size W [--drop-last]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepConfig {
    pub accum: usize,
    pub world_size: usize,
    pub drop_last: bool,
}

impl StepConfig {
    pub fn micro_batches_per_step(&self) -> usize {
        self.accum * self.world_size
    }
}

/// One micro-batch as the simulation sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct MicroBatch {
    /// Its first record.
    pub line: usize,
    /// Trained targets (n).
    pub trained: u64,
    /// Σℓm over them.
    pub masked_loss_sum: f64,
    pub user: Option<UserMicroBatch>,
}

/// The user's loss on one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct UserMicroBatch {
    pub value: f64,
    /// Per-target weights from the gradient (`[B, T-1]`), with the target mask beside them.
    pub weights: Option<Vec<f64>>,
    pub mask: Vec<u8>,
}

/// How a trainer turns micro-batch losses into a step's gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepFormula {
    /// Σℓm / N over the whole step: the truth.
    GlobalTokenMean,
    /// Each micro-batch's token mean, averaged over the K×W micro-batches.
    MeanOfMicroBatchMeans,
    /// Each rank divides by its own token count; ranks are averaged.
    PerRankTokenMean,
    /// Hugging Face with `num_items_in_batch` counted over all micro-batches and ranks
    /// (`average_tokens_across_devices`): equal to the truth by design.
    NumItemsInBatch,
    /// Micro-batch means summed without dividing by K: a model that ignores
    /// `num_items_in_batch` under a trainer that expects it to use it.
    MicroBatchMeansNotDividedByK,
    /// The user's loss called per micro-batch, scaled by 1/K and averaged over ranks, unless
    /// it takes `num_items_in_batch`.
    YourLoss,
}

impl StepFormula {
    pub const FIXED: [StepFormula; 5] = [
        StepFormula::GlobalTokenMean,
        StepFormula::MeanOfMicroBatchMeans,
        StepFormula::PerRankTokenMean,
        StepFormula::NumItemsInBatch,
        StepFormula::MicroBatchMeansNotDividedByK,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StepFormula::GlobalTokenMean => "global_token_mean",
            StepFormula::MeanOfMicroBatchMeans => "mean_of_micro_batch_means",
            StepFormula::PerRankTokenMean => "per_rank_token_mean",
            StepFormula::NumItemsInBatch => "num_items_in_batch",
            StepFormula::MicroBatchMeansNotDividedByK => "micro_batch_means_not_divided_by_k",
            StepFormula::YourLoss => "your_loss",
        }
    }
}

/// One formula on one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FormulaStep {
    pub formula: StepFormula,
    /// max w / min w over the step's trained targets (1 = uniform); null when a trained
    /// target gets no weight.
    pub max_min_ratio: Option<f64>,
    /// The heaviest trained target's weight relative to the truth's 1/N, after normalising the
    /// step's weights to sum to 1: 5 means one token counts five times.
    pub max_relative_weight: f64,
    /// Total-variation distance of the normalised weights from the uniform 1/N over trained
    /// targets (weight on untrained targets counts fully): 0 for the truth.
    pub total_variation: f64,
    /// Σw over the step: 1 for the truth; a partial window divided by the full K gets less.
    pub total_weight: f64,
    /// What a logger would print for the step.
    pub logged_loss: Option<f64>,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Step {
    /// 1-based.
    pub index: usize,
    /// First record of its first micro-batch.
    pub line: usize,
    pub micro_batches: usize,
    pub trained: u64,
    pub formulas: Vec<FormulaStep>,
}

/// A group of targets that share one weight (a micro-batch under a fixed formula).
struct Group {
    count: u64,
    weight: f64,
}

/// Spread figures over weighted groups of trained targets, plus weight on untrained ones.
fn spread(groups: &[Group], untrained_weight: f64, trained: u64) -> (Option<f64>, f64, f64, f64) {
    let total: f64 = groups
        .iter()
        .map(|g| g.count as f64 * g.weight)
        .sum::<f64>()
        + untrained_weight;
    let n = trained as f64;
    if trained == 0 || total == 0.0 {
        return (None, 0.0, 0.0, total);
    }
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    let mut tv = untrained_weight.abs() / total.abs();
    for g in groups.iter().filter(|g| g.count > 0) {
        lo = lo.min(g.weight);
        hi = hi.max(g.weight);
        tv += g.count as f64 * (g.weight / total - 1.0 / n).abs();
    }
    let ratio = (lo > 0.0).then(|| hi / lo);
    (ratio, hi / total * n, tv / 2.0, total)
}

/// Evaluates every formula on one step's micro-batches.
pub fn evaluate(
    index: usize,
    step: &[MicroBatch],
    config: StepConfig,
    user_takes_count: bool,
) -> Step {
    let k = config.accum as f64;
    let w = config.world_size as f64;
    let trained: u64 = step.iter().map(|m| m.trained).sum();
    let sum: f64 = step.iter().map(|m| m.masked_loss_sum).sum();
    let n = trained as f64;
    let rank_of = |i: usize| i % config.world_size;
    // Only ranks that got a micro-batch: memory from the step, not from --world-size.
    let ranks = config.world_size.min(step.len());
    let mut rank_trained = vec![0u64; ranks];
    let mut rank_sum = vec![0f64; ranks];
    for (i, m) in step.iter().enumerate() {
        rank_trained[rank_of(i)] += m.trained;
        rank_sum[rank_of(i)] += m.masked_loss_sum;
    }
    let mean = |m: &MicroBatch| (m.trained > 0).then(|| m.masked_loss_sum / m.trained as f64);
    let groups = |weight: &dyn Fn(usize, &MicroBatch) -> f64| -> Vec<Group> {
        step.iter()
            .enumerate()
            .filter(|(_, m)| m.trained > 0)
            .map(|(i, m)| Group {
                count: m.trained,
                weight: weight(i, m),
            })
            .collect()
    };
    let fixed = |formula: StepFormula| -> FormulaStep {
        let (g, logged) = match formula {
            StepFormula::GlobalTokenMean | StepFormula::NumItemsInBatch => {
                (groups(&|_, _| 1.0 / n), (trained > 0).then(|| sum / n))
            }
            StepFormula::MeanOfMicroBatchMeans => (
                groups(&|_, m| 1.0 / (k * w * m.trained as f64)),
                Some(step.iter().filter_map(mean).sum::<f64>() / (k * w)),
            ),
            StepFormula::PerRankTokenMean => (
                groups(&|i, _| 1.0 / (w * rank_trained[rank_of(i)] as f64)),
                Some(
                    (0..ranks)
                        .filter(|&r| rank_trained[r] > 0)
                        .map(|r| rank_sum[r] / rank_trained[r] as f64)
                        .sum::<f64>()
                        / w,
                ),
            ),
            StepFormula::MicroBatchMeansNotDividedByK => (
                groups(&|_, m| 1.0 / (w * m.trained as f64)),
                Some(step.iter().filter_map(mean).sum::<f64>() / w),
            ),
            StepFormula::YourLoss => unreachable!("not a fixed formula"),
        };
        let (max_min_ratio, max_relative_weight, total_variation, total_weight) =
            spread(&g, 0.0, trained);
        FormulaStep {
            formula,
            max_min_ratio,
            max_relative_weight,
            total_variation,
            total_weight,
            logged_loss: logged.filter(|_| trained > 0),
        }
    };
    let mut formulas: Vec<FormulaStep> = StepFormula::FIXED.iter().map(|&f| fixed(f)).collect();
    if let Some(user) = your_loss(step, k * w, user_takes_count, trained) {
        formulas.push(user);
    }
    Step {
        index,
        line: step.first().map_or(0, |m| m.line),
        micro_batches: step.len(),
        trained,
        formulas,
    }
}

/// The user's loss per micro-batch: its gradient weights scaled as the trainer scales it.
fn your_loss(
    step: &[MicroBatch],
    micro_batches_per_step: f64,
    takes_count: bool,
    trained: u64,
) -> Option<FormulaStep> {
    let users: Vec<&UserMicroBatch> = step.iter().filter_map(|m| m.user.as_ref()).collect();
    if users.len() != step.len() || users.is_empty() {
        return None;
    }
    // With num_items_in_batch the loss already divides by the step's count; Hugging Face then
    // multiplies by W to undo the ranks' averaging, and does not divide by K.
    let scale = if takes_count {
        1.0
    } else {
        1.0 / micro_batches_per_step
    };
    let logged = users.iter().map(|u| u.value).sum::<f64>() * scale;
    let mut groups = vec![];
    let mut untrained = 0.0;
    for u in &users {
        let weights = u.weights.as_ref()?;
        for (&wt, &m) in weights.iter().zip(&u.mask) {
            if m != 0 {
                groups.push(Group {
                    count: 1,
                    weight: wt * scale,
                });
            } else {
                untrained += (wt * scale).abs();
            }
        }
    }
    let (max_min_ratio, max_relative_weight, total_variation, total_weight) =
        spread(&groups, untrained, trained);
    Some(FormulaStep {
        formula: StepFormula::YourLoss,
        max_min_ratio,
        max_relative_weight,
        total_variation,
        total_weight,
        logged_loss: Some(logged),
    })
}

/// Per formula, over every step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FormulaSummary {
    pub formula: StepFormula,
    /// The step whose weights are furthest from uniform, and by how much.
    pub worst_step: usize,
    pub worst_total_variation: f64,
    pub worst_max_min_ratio: Option<f64>,
    pub worst_max_relative_weight: f64,
    pub min_total_weight: f64,
    pub max_total_weight: f64,
    /// The logged loss averaged over steps.
    pub mean_logged_loss: Option<f64>,
}

/// The whole simulation, for the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    pub accum: usize,
    pub world_size: usize,
    pub micro_batch_rows: usize,
    pub drop_last: bool,
    /// Micro-batches left out: the partial last step under `--drop-last`.
    pub dropped_micro_batches: usize,
    pub formulas: Vec<FormulaSummary>,
    pub steps: Vec<Step>,
}

impl StepReport {
    pub fn of(
        config: StepConfig,
        micro_batch_rows: usize,
        dropped: usize,
        steps: Vec<Step>,
    ) -> Self {
        let mut formulas = vec![];
        let present: Vec<StepFormula> = steps
            .first()
            .map(|s| s.formulas.iter().map(|f| f.formula).collect())
            .unwrap_or_default();
        for formula in present {
            let each: Vec<(usize, &FormulaStep)> = steps
                .iter()
                .filter_map(|s| {
                    s.formulas
                        .iter()
                        .find(|f| f.formula == formula)
                        .map(|f| (s.index, f))
                })
                .collect();
            let Some(&(worst_step, worst)) = each
                .iter()
                .max_by(|a, b| a.1.total_variation.total_cmp(&b.1.total_variation))
            else {
                continue;
            };
            let logged: Vec<f64> = each.iter().filter_map(|(_, f)| f.logged_loss).collect();
            formulas.push(FormulaSummary {
                formula,
                worst_step,
                worst_total_variation: worst.total_variation,
                worst_max_min_ratio: each
                    .iter()
                    .map(|(_, f)| f.max_min_ratio.unwrap_or(f64::INFINITY))
                    .fold(None, |a: Option<f64>, x| Some(a.map_or(x, |a| a.max(x)))),
                worst_max_relative_weight: each
                    .iter()
                    .map(|(_, f)| f.max_relative_weight)
                    .fold(0.0, f64::max),
                min_total_weight: each
                    .iter()
                    .map(|(_, f)| f.total_weight)
                    .fold(f64::INFINITY, f64::min),
                max_total_weight: each
                    .iter()
                    .map(|(_, f)| f.total_weight)
                    .fold(f64::NEG_INFINITY, f64::max),
                mean_logged_loss: (!logged.is_empty())
                    .then(|| logged.iter().sum::<f64>() / logged.len() as f64),
            });
        }
        Self {
            accum: config.accum,
            world_size: config.world_size,
            micro_batch_rows,
            drop_last: config.drop_last,
            dropped_micro_batches: dropped,
            formulas,
            steps,
        }
    }

    pub fn formula(&self, formula: StepFormula) -> Option<&FormulaSummary> {
        self.formulas.iter().find(|f| f.formula == formula)
    }
}

/// How far from the truth a step may be (total variation, and |Σw − 1|) before the finding
/// fires: 1%.
pub const MISWEIGHT_TOLERANCE: f64 = 0.01;

impl FormulaSummary {
    /// Whether this formula misweights some step beyond [`MISWEIGHT_TOLERANCE`].
    pub fn misweights(&self) -> bool {
        self.worst_total_variation > MISWEIGHT_TOLERANCE
            || (self.min_total_weight - 1.0).abs() > MISWEIGHT_TOLERANCE
            || (self.max_total_weight - 1.0).abs() > MISWEIGHT_TOLERANCE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mb(line: usize, trained: u64, loss_per_token: f64) -> MicroBatch {
        MicroBatch {
            line,
            trained,
            masked_loss_sum: trained as f64 * loss_per_token,
            user: None,
        }
    }

    fn get(step: &Step, f: StepFormula) -> FormulaStep {
        *step.formulas.iter().find(|x| x.formula == f).unwrap()
    }

    const ONE_RANK_TWO_STEPS: StepConfig = StepConfig {
        accum: 2,
        world_size: 1,
        drop_last: false,
    };

    #[test]
    fn a_mean_of_means_gives_the_lone_token_five_times_its_weight() {
        // Micro-batches of 1 and 9 trained tokens in one step of K = 2.
        let step = evaluate(
            1,
            &[mb(1, 1, 2.0), mb(5, 9, 1.0)],
            ONE_RANK_TWO_STEPS,
            false,
        );
        let truth = get(&step, StepFormula::GlobalTokenMean);
        assert_eq!(truth.total_variation, 0.0);
        assert!((truth.max_relative_weight - 1.0).abs() < 1e-12);
        assert!((truth.logged_loss.unwrap() - 11.0 / 10.0).abs() < 1e-12);
        let mom = get(&step, StepFormula::MeanOfMicroBatchMeans);
        // 0.5 for the lone token against the truth's 0.1; 1/18 for the others.
        assert!((mom.max_relative_weight - 5.0).abs() < 1e-12);
        assert!((mom.max_min_ratio.unwrap() - 9.0).abs() < 1e-12);
        assert!((mom.total_weight - 1.0).abs() < 1e-12);
        assert!((mom.total_variation - 0.4).abs() < 1e-12);
        assert!((mom.logged_loss.unwrap() - 1.5).abs() < 1e-12);
        // Not divided by K: twice the weight, twice the logged loss.
        let sum = get(&step, StepFormula::MicroBatchMeansNotDividedByK);
        assert!((sum.total_weight - 2.0).abs() < 1e-12);
        assert!((sum.logged_loss.unwrap() - 3.0).abs() < 1e-12);
        assert_eq!(
            get(&step, StepFormula::NumItemsInBatch),
            FormulaStep {
                formula: StepFormula::NumItemsInBatch,
                ..truth
            }
        );
    }

    #[test]
    fn ranks_dividing_by_their_own_count_misweight() {
        let config = StepConfig {
            accum: 1,
            world_size: 2,
            drop_last: false,
        };
        let step = evaluate(1, &[mb(1, 1, 1.0), mb(2, 3, 1.0)], config, false);
        let per_rank = get(&step, StepFormula::PerRankTokenMean);
        // Rank 0's one token weighs 1/2, rank 1's three weigh 1/6: 2× the truth's 1/4.
        assert!((per_rank.max_relative_weight - 2.0).abs() < 1e-12);
        assert!((per_rank.max_min_ratio.unwrap() - 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_partial_last_window_is_underweighted() {
        let step = evaluate(2, &[mb(9, 4, 1.0)], ONE_RANK_TWO_STEPS, false);
        assert_eq!(step.micro_batches, 1);
        let mom = get(&step, StepFormula::MeanOfMicroBatchMeans);
        assert!((mom.total_weight - 0.5).abs() < 1e-12);
        assert_eq!(mom.total_variation, 0.0);
        let truth = get(&step, StepFormula::GlobalTokenMean);
        assert!((truth.total_weight - 1.0).abs() < 1e-12);
        let report = StepReport::of(ONE_RANK_TWO_STEPS, 4, 0, vec![step]);
        assert!(report
            .formula(StepFormula::MeanOfMicroBatchMeans)
            .unwrap()
            .misweights());
        assert!(!report
            .formula(StepFormula::GlobalTokenMean)
            .unwrap()
            .misweights());
    }

    #[test]
    fn a_loss_taking_num_items_is_the_truth_and_a_per_batch_mean_is_not() {
        // Two micro-batches, each one row of three targets, 1 and 3 of them trained.
        let masks = [vec![1u8, 0, 0], vec![1u8, 1, 1]];
        let user = |mask: &Vec<u8>, weights: Vec<f64>| UserMicroBatch {
            value: 1.0,
            weights: Some(weights),
            mask: mask.clone(),
        };
        let with = |users: [UserMicroBatch; 2]| {
            let [a, b] = users;
            vec![
                MicroBatch {
                    user: Some(a),
                    ..mb(1, 1, 1.0)
                },
                MicroBatch {
                    user: Some(b),
                    ..mb(2, 3, 1.0)
                },
            ]
        };
        // num_items_in_batch = 4: each trained target weighs 1/4 already.
        let counted = with([
            user(&masks[0], vec![0.25, 0.0, 0.0]),
            user(&masks[1], vec![0.25, 0.25, 0.25]),
        ]);
        let step = evaluate(1, &counted, ONE_RANK_TWO_STEPS, true);
        let yours = get(&step, StepFormula::YourLoss);
        assert!(yours.total_variation < 1e-12);
        assert!((yours.total_weight - 1.0).abs() < 1e-12);
        // A per-micro-batch token mean, scaled by 1/K: the mean of means.
        let per_batch = with([
            user(&masks[0], vec![1.0, 0.0, 0.0]),
            user(&masks[1], vec![1.0 / 3.0; 3]),
        ]);
        let step = evaluate(1, &per_batch, ONE_RANK_TWO_STEPS, false);
        let yours = get(&step, StepFormula::YourLoss);
        let mom = get(&step, StepFormula::MeanOfMicroBatchMeans);
        assert!((yours.total_variation - mom.total_variation).abs() < 1e-12);
        assert!((yours.max_relative_weight - 2.0).abs() < 1e-12);
    }
}
