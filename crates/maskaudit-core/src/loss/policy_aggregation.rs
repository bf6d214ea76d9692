//! Which aggregation a policy loss uses, read from its per-token weights (pure: no tensors).
//!
//! The weight of a token is −∂loss/∂logprob under the probe (advantages 1, old log-probs equal
//! to the current ones, so every ratio is 1): the share of the step a token's log-probability
//! gets. With a response of L_b tokens in row b of B rows and N response tokens in the batch,
//! the published aggregations give each token of row b:
//!
//! | aggregation | per-token weight | sequence total |
//! |---|---|---|
//! | `token_mean` (trl bnpo, dapo; verl token-mean) | 1/N | L_b/N: ∝ length |
//! | `seq_mean_token_mean` (trl grpo; verl seq-mean-token-mean) | 1/(B·L_b) | 1/B: constant |
//! | `seq_mean_token_sum` (verl seq-mean-token-sum) | 1/B | L_b/B: ∝ length |
//! | `seq_mean_token_sum_norm` (trl dr_grpo; verl seq-mean-token-sum-norm) | 1/C | L_b/C |
//!
//! A (B,1) sequence term broadcast against the mask gives per-token weights ∝ L_b and
//! sequence totals ∝ L_b² (trl PR 6654): none of the four. No tch here: this moves into the
//! torch-free core crate.

use serde::Serialize;

/// Relative agreement asked of float32 gradients: far above their rounding, far below any
/// real difference between two aggregations.
pub const TOLERANCE: f64 = 1e-4;

/// Share of |weight| on masked targets above which a loss trains them: a masked loss leaves
/// exactly zero there.
pub const LEAK_SHARE: f64 = 1e-6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    TokenMean,
    SeqMeanTokenMean,
    SeqMeanTokenSum,
    SeqMeanTokenSumNorm,
}

impl Aggregation {
    pub const ALL: [Aggregation; 4] = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
        Aggregation::SeqMeanTokenSumNorm,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Aggregation::TokenMean => "token_mean",
            Aggregation::SeqMeanTokenMean => "seq_mean_token_mean",
            Aggregation::SeqMeanTokenSum => "seq_mean_token_sum",
            Aggregation::SeqMeanTokenSumNorm => "seq_mean_token_sum_norm",
        }
    }
}

impl std::str::FromStr for Aggregation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().replace('-', "_");
        Aggregation::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let known: Vec<_> = Aggregation::ALL.iter().map(|a| a.name()).collect();
                format!("unknown aggregation '{s}' (known: {})", known.join(", "))
            })
    }
}

/// What a next-token target is to the policy loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// A response token the mask trains.
    Trained,
    /// A real token the mask excludes: prompt, tool output.
    Masked,
    /// Padding (appended by batching or in the row).
    Padding,
}

/// The probe's weights over one batch, `[rows, targets]` row-major.
#[derive(Debug, Clone)]
pub struct WeightedBatch {
    /// The record number of each row.
    pub lines: Vec<usize>,
    pub targets: usize,
    /// −∂loss/∂logprob per target.
    pub weights: Vec<f64>,
    pub kinds: Vec<TargetKind>,
    /// `num_items_in_batch` as the loss got it, when it takes it; else the batch's count.
    pub num_items: f64,
}

/// One row under the probe.
#[derive(Debug, Clone, Serialize)]
pub struct RowWeight {
    pub line: usize,
    /// Trained response tokens (L_b).
    pub length: usize,
    /// The mean weight of its trained tokens.
    pub token_weight: f64,
    /// Σ weight over its trained tokens: what the row counts for in the step.
    pub sequence_weight: f64,
    /// Largest relative deviation of a trained token's weight from the row's mean.
    pub spread: f64,
}

/// The shape the weights of one batch take across its rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// Every trained token weighs `c`.
    Uniform(f64),
    /// Row b's tokens weigh k/L_b.
    InverseLength(f64),
    /// Row b's tokens weigh k·L_b: a (B,1) term broadcast against the mask.
    Length(f64),
    /// None of those (or weights that differ within a row).
    Irregular,
}

/// One batch analysed.
#[derive(Debug, Clone)]
pub struct BatchShape {
    pub line: usize,
    pub rows: Vec<RowWeight>,
    pub shape: Shape,
    /// Whether the trained rows have different lengths (else token and sequence means agree).
    pub lengths_vary: bool,
    /// Σ|w| on masked or padding targets / Σ|w|, and the padding part alone.
    pub masked_share: f64,
    pub padding_share: f64,
    /// First record of a row with weight on a masked target.
    pub leak_line: Option<usize>,
    pub batch_rows: usize,
    pub num_items: f64,
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= TOLERANCE * a.abs().max(b.abs())
}

fn all_close(values: &[f64]) -> bool {
    values
        .first()
        .is_some_and(|&x| values.iter().all(|&v| close(v, x)))
}

/// The rows' weights, the leak, and the batch's shape.
pub fn analyse(batch: &WeightedBatch) -> BatchShape {
    let t = batch.targets;
    let mut rows = vec![];
    let (mut total, mut masked, mut padding) = (0.0, 0.0, 0.0);
    let mut leak_line = None;
    for (r, &line) in batch.lines.iter().enumerate() {
        let span = r * t..(r + 1) * t;
        let (w, k) = (&batch.weights[span.clone()], &batch.kinds[span]);
        let trained: Vec<f64> = w
            .iter()
            .zip(k)
            .filter(|(_, &k)| k == TargetKind::Trained)
            .map(|(&w, _)| w)
            .collect();
        for (&w, &k) in w.iter().zip(k) {
            total += w.abs();
            if k != TargetKind::Trained && w != 0.0 {
                masked += w.abs();
                padding += if k == TargetKind::Padding {
                    w.abs()
                } else {
                    0.0
                };
                leak_line.get_or_insert(line);
            }
        }
        if trained.is_empty() {
            continue;
        }
        let sum: f64 = trained.iter().sum();
        let mean = sum / trained.len() as f64;
        let spread = trained
            .iter()
            .map(|w| (w - mean).abs() / mean.abs().max(f64::MIN_POSITIVE))
            .fold(0.0, f64::max);
        rows.push(RowWeight {
            line,
            length: trained.len(),
            token_weight: mean,
            sequence_weight: sum,
            spread,
        });
    }
    let share = |x: f64| if total > 0.0 { x / total } else { 0.0 };
    let lengths_vary = rows.windows(2).any(|p| p[0].length != p[1].length);
    BatchShape {
        line: batch.lines.first().copied().unwrap_or(0),
        shape: shape_of(&rows),
        rows,
        lengths_vary,
        masked_share: share(masked),
        padding_share: share(padding),
        leak_line,
        batch_rows: batch.lines.len(),
        num_items: batch.num_items,
    }
}

fn shape_of(rows: &[RowWeight]) -> Shape {
    if rows.is_empty() || rows.iter().any(|r| r.spread > TOLERANCE) {
        return Shape::Irregular;
    }
    let per_token: Vec<f64> = rows.iter().map(|r| r.token_weight).collect();
    let times_len: Vec<f64> = rows.iter().map(|r| r.sequence_weight).collect();
    let over_len: Vec<f64> = rows
        .iter()
        .map(|r| r.token_weight / r.length as f64)
        .collect();
    if all_close(&per_token) {
        Shape::Uniform(per_token[0])
    } else if all_close(&times_len) {
        Shape::InverseLength(times_len[0])
    } else if all_close(&over_len) {
        Shape::Length(over_len[0])
    } else {
        Shape::Irregular
    }
}

/// The scale at which batch `b` fits `aggregation` (1 = exactly), when its shape fits it.
fn scale(b: &BatchShape, aggregation: Aggregation) -> Option<f64> {
    let rows = b.batch_rows as f64;
    match (aggregation, b.shape) {
        (Aggregation::TokenMean, Shape::Uniform(c)) => Some(c * b.num_items),
        (Aggregation::SeqMeanTokenSum, Shape::Uniform(c)) => Some(c * rows),
        (Aggregation::SeqMeanTokenMean, Shape::InverseLength(k)) => Some(k * rows),
        // Rows of one length: 1/(B·L) per token is uniform.
        (Aggregation::SeqMeanTokenMean, Shape::Uniform(c)) if !b.lengths_vary => {
            Some(c * rows * b.rows[0].length as f64)
        }
        _ => None,
    }
}

/// The run's verdict on the aggregation.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Classification {
    /// One of the four, or null.
    pub aggregation: Option<Aggregation>,
    /// `seq_mean_token_sum_norm`'s divisor C (each token weighs 1/C), when one C fits every batch.
    pub constant: Option<f64>,
    /// The divisor of each batch, for `seq_mean_token_sum_norm`.
    pub constants: Vec<f64>,
    /// The loss's weights are the aggregation's times this (1 = exactly the formula): a loss
    /// coefficient, or a division by the accumulation steps.
    pub scale: Option<f64>,
    /// Aggregations that fit every batch equally (several when the data cannot tell them apart).
    pub candidates: Vec<Aggregation>,
    /// Sequence weight ∝ length^exponent (least squares on logs, within batches): 0 constant
    /// per sequence, 1 ∝ length, 2 ∝ length² (a broadcast (B,1) term); null when no batch has
    /// rows of different lengths.
    pub sequence_weight_exponent: Option<f64>,
    /// Per-token weight ∝ length^exponent (the above minus 1).
    pub token_weight_exponent: Option<f64>,
    /// `constant per sequence`, `∝ length`, `∝ length²`, or what the exponent is.
    pub length_bias: String,
    /// In words: why no aggregation, or which shape.
    pub note: String,
}

/// The aggregation that fits every batch.
///
/// Long because it is one decision in order: shape, exact fits, a constant divisor, a scaled
/// fit, each returning.
pub fn classify(batches: &[BatchShape]) -> Classification {
    let mut c = Classification {
        sequence_weight_exponent: exponent(batches),
        ..Classification::default()
    };
    c.token_weight_exponent = c.sequence_weight_exponent.map(|e| e - 1.0);
    c.length_bias = match c.sequence_weight_exponent {
        None => "unknown: every response has the same length".into(),
        Some(e) if (e - 0.0).abs() < 0.05 => "constant per sequence".into(),
        Some(e) if (e - 1.0).abs() < 0.05 => "∝ length".into(),
        Some(e) if (e - 2.0).abs() < 0.05 => {
            "∝ length² (a (B,1) term broadcast against the mask)".into()
        }
        Some(e) => format!("∝ length^{e:.2}"),
    };
    let batches: Vec<&BatchShape> = batches.iter().filter(|b| !b.rows.is_empty()).collect();
    if batches.is_empty() {
        c.note = "no batch has a trained response token".into();
        return c;
    }
    if batches.iter().any(|b| b.shape == Shape::Irregular) {
        c.note = "token weights differ within a sequence, or follow no length rule".into();
        return c;
    }
    if batches.iter().any(|b| matches!(b.shape, Shape::Length(_))) {
        c.note = "per-token weights grow with the response length: a (B,1) term broadcast against the mask".into();
        return c;
    }
    let fits = |a: Aggregation| -> Option<Vec<f64>> {
        batches
            .iter()
            .map(|b| scale(b, a))
            .collect::<Option<Vec<f64>>>()
    };
    let exact: Vec<Aggregation> = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
    ]
    .into_iter()
    .filter(|&a| fits(a).is_some_and(|s| s.iter().all(|&s| close(s, 1.0))))
    .collect();
    let uniform: Option<Vec<f64>> = batches
        .iter()
        .map(|b| match b.shape {
            Shape::Uniform(w) if w != 0.0 => Some(1.0 / w),
            _ => None,
        })
        .collect();
    c.constants = uniform.clone().unwrap_or_default();
    match exact.as_slice() {
        [one] => {
            c.aggregation = Some(*one);
            c.scale = Some(1.0);
            c.candidates = exact;
            return c;
        }
        [_, _, ..] => {
            c.candidates = exact;
            c.note =
                "several aggregations fit: the responses need different lengths to tell them apart"
                    .into();
            return c;
        }
        [] => {}
    }
    if let Some(constants) = uniform.as_ref().filter(|k| all_close(k)) {
        c.aggregation = Some(Aggregation::SeqMeanTokenSumNorm);
        c.constant = Some(constants[0]);
        c.scale = Some(1.0);
        c.candidates = vec![Aggregation::SeqMeanTokenSumNorm];
        return c;
    }
    let scaled: Vec<(Aggregation, f64)> = [
        Aggregation::TokenMean,
        Aggregation::SeqMeanTokenMean,
        Aggregation::SeqMeanTokenSum,
    ]
    .into_iter()
    .filter_map(|a| fits(a).filter(|s| all_close(s)).map(|s| (a, s[0])))
    .collect();
    if let [(a, s)] = scaled.as_slice() {
        c.aggregation = Some(*a);
        c.scale = Some(*s);
        c.candidates = vec![*a];
        c.note = format!("the weights are {} times the formula's", fmt_scale(*s));
        return c;
    }
    if uniform.is_some() {
        c.aggregation = Some(Aggregation::SeqMeanTokenSumNorm);
        c.candidates = vec![Aggregation::SeqMeanTokenSumNorm];
        c.note = "a constant divisor per batch that changes between batches (one that follows the padded length, say)".into();
        return c;
    }
    c.candidates = scaled.iter().map(|(a, _)| *a).collect();
    c.note = "the weights fit no aggregation at one scale across batches".into();
    c
}

fn fmt_scale(s: f64) -> String {
    format!("{s:.4}")
}

/// Slope of log(sequence weight) on log(length), each batch centred on its own means (so a
/// per-batch divisor drops out). None without two lengths in a batch.
pub fn exponent(batches: &[BatchShape]) -> Option<f64> {
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for b in batches.iter().filter(|b| b.lengths_vary) {
        let pts: Vec<(f64, f64)> = b
            .rows
            .iter()
            .filter(|r| r.sequence_weight > 0.0)
            .map(|r| ((r.length as f64).ln(), r.sequence_weight.ln()))
            .collect();
        if pts.len() < 2 {
            continue;
        }
        let n = pts.len() as f64;
        let mx = pts.iter().map(|p| p.0).sum::<f64>() / n;
        let my = pts.iter().map(|p| p.1).sum::<f64>() / n;
        for (x, y) in pts {
            sxy += (x - mx) * (y - my);
            sxx += (x - mx) * (x - mx);
        }
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

/// One optimizer step of a policy loss under `--accum`/`--world-size`.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyStep {
    pub index: usize,
    pub line: usize,
    pub micro_batches: usize,
    /// Response tokens of the step (what `num_items_in_batch` counts).
    pub trained: u64,
    /// Σ weight of the step as the trainer sums it: each micro-batch's loss called with the
    /// step's count when it takes `num_items_in_batch` (not divided by K), else divided by K×W.
    pub total_weight: f64,
    /// What the step should weigh: 1 when the loss takes `num_items_in_batch` (a token mean
    /// over the step); else the mean of the micro-batches' totals called alone (what the
    /// trainer's division by K×W gives by construction).
    pub expected_weight: f64,
}

impl PolicyStep {
    /// `total / expected`: 1 when the step is normalised as one batch would be; 1/K for an
    /// extra division by the accumulation steps.
    pub fn ratio(&self) -> Option<f64> {
        (self.expected_weight != 0.0).then(|| self.total_weight / self.expected_weight)
    }
}

/// A micro-batch's totals for the step check.
#[derive(Debug, Clone, Copy)]
pub struct MicroTotals {
    pub line: usize,
    pub trained: u64,
    /// Σ weight called alone (its own count as `num_items_in_batch`).
    pub alone: f64,
    /// Σ weight called with the step's count.
    pub in_step: f64,
}

/// The step's totals; `takes_count`: the loss takes `num_items_in_batch`.
pub fn step(index: usize, micro: &[MicroTotals], per_step: usize, takes_count: bool) -> PolicyStep {
    let trained: u64 = micro.iter().map(|m| m.trained).sum();
    // With the step's count the loss is a token mean over the step by design: each of its N
    // tokens weighs 1/N, Σ = 1 (the truth of `loss::steps`).
    let (total, expected) = if takes_count {
        (micro.iter().map(|m| m.in_step).sum(), 1.0)
    } else {
        let k = per_step as f64;
        let sum: f64 = micro.iter().map(|m| m.alone).sum();
        (sum / k, sum / micro.len().max(1) as f64)
    };
    PolicyStep {
        index,
        line: micro.first().map_or(0, |m| m.line),
        micro_batches: micro.len(),
        trained,
        total_weight: total,
        expected_weight: expected,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch of rows with `lengths` trained tokens after `prompt` masked ones, padded to the
    /// longest, each token weighing `weight(B, L_b, N)`.
    fn batch(
        lengths: &[usize],
        prompt: usize,
        weight: impl Fn(f64, f64, f64) -> f64,
    ) -> BatchShape {
        let t = prompt + lengths.iter().max().unwrap();
        let n: usize = lengths.iter().sum();
        let b = lengths.len() as f64;
        let (mut weights, mut kinds) = (vec![], vec![]);
        for &l in lengths {
            for p in 0..t {
                let kind = if p < prompt {
                    TargetKind::Masked
                } else if p < prompt + l {
                    TargetKind::Trained
                } else {
                    TargetKind::Padding
                };
                kinds.push(kind);
                let w = weight(b, l as f64, n as f64);
                weights.push(if kind == TargetKind::Trained { w } else { 0.0 });
            }
        }
        analyse(&WeightedBatch {
            lines: (1..=lengths.len()).collect(),
            targets: t,
            weights,
            kinds,
            num_items: n as f64,
        })
    }

    fn classified(batches: &[BatchShape]) -> (Option<&'static str>, Option<f64>) {
        let c = classify(batches);
        (c.aggregation.map(|a| a.name()), c.sequence_weight_exponent)
    }

    #[test]
    fn the_four_aggregations_are_told_apart() {
        let lengths: &[&[usize]] = &[&[2, 5, 3], &[4, 1]];
        let run = |w: &dyn Fn(f64, f64, f64) -> f64| {
            let b: Vec<BatchShape> = lengths.iter().map(|l| batch(l, 2, w)).collect();
            classified(&b)
        };
        let (a, e) = run(&|_, _, n| 1.0 / n);
        assert_eq!(a, Some("token_mean"));
        assert!((e.unwrap() - 1.0).abs() < 1e-9);
        let (a, e) = run(&|b, l, _| 1.0 / (b * l));
        assert_eq!(a, Some("seq_mean_token_mean"));
        assert!(e.unwrap().abs() < 1e-9);
        assert_eq!(run(&|b, _, _| 1.0 / b).0, Some("seq_mean_token_sum"));
        let b: Vec<BatchShape> = lengths
            .iter()
            .map(|l| batch(l, 2, |_, _, _| 1.0 / 64.0))
            .collect();
        let c = classify(&b);
        assert_eq!(c.aggregation, Some(Aggregation::SeqMeanTokenSumNorm));
        assert!((c.constant.unwrap() - 64.0).abs() < 1e-9);
        let (a, e) = run(&|_, l, n| l / n);
        assert_eq!(a, None);
        assert!((e.unwrap() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_scaled_token_mean_reports_its_scale() {
        let b = vec![
            batch(&[2, 5], 0, |_, _, n| 0.5 / n),
            batch(&[3, 1], 0, |_, _, n| 0.5 / n),
        ];
        let c = classify(&b);
        assert_eq!(c.aggregation, Some(Aggregation::TokenMean));
        assert!((c.scale.unwrap() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn equal_lengths_cannot_tell_token_from_sequence_means() {
        let c = classify(&[batch(&[3, 3], 1, |_, _, n| 1.0 / n)]);
        assert_eq!(c.aggregation, None);
        assert_eq!(c.candidates.len(), 2);
        assert_eq!(c.sequence_weight_exponent, None);
    }

    #[test]
    fn weight_on_masked_targets_is_a_leak() {
        let mut b = WeightedBatch {
            lines: vec![7],
            targets: 3,
            weights: vec![0.1, 0.5, 0.5],
            kinds: vec![TargetKind::Masked, TargetKind::Trained, TargetKind::Trained],
            num_items: 2.0,
        };
        let shape = analyse(&b);
        assert!((shape.masked_share - 0.1 / 1.1).abs() < 1e-12);
        assert_eq!(shape.leak_line, Some(7));
        b.weights[0] = 0.0;
        assert_eq!(analyse(&b).masked_share, 0.0);
    }

    #[test]
    fn an_extra_division_by_the_accumulation_steps_halves_the_step() {
        // Token mean over the step's count: 3 and 1 tokens, Σ = 1 over the step.
        let good = [
            MicroTotals {
                line: 1,
                trained: 3,
                alone: 1.0,
                in_step: 0.75,
            },
            MicroTotals {
                line: 2,
                trained: 1,
                alone: 1.0,
                in_step: 0.25,
            },
        ];
        assert!((step(1, &good, 2, true).ratio().unwrap() - 1.0).abs() < 1e-12);
        let halved = good.map(|m| MicroTotals {
            in_step: m.in_step / 2.0,
            ..m
        });
        assert!((step(1, &halved, 2, true).ratio().unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(
            "seq-mean-token-mean".parse(),
            Ok(Aggregation::SeqMeanTokenMean)
        );
    }
}

/// A probe that changes what a correct policy loss must ignore.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyProbe {
    pub ran: bool,
    pub passed: Option<bool>,
    /// What it did, or why it did not run.
    pub note: String,
    /// The first record of the first batch that failed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
}

impl PolicyProbe {
    pub fn skipped(note: &str) -> Self {
        PolicyProbe {
            note: note.into(),
            ..PolicyProbe::default()
        }
    }

    /// One batch's outcome; the first failure is kept.
    pub fn record(&mut self, passed: bool, line: usize) {
        self.ran = true;
        if !passed && self.passed != Some(false) {
            self.line = Some(line);
        }
        self.passed = Some(self.passed.unwrap_or(true) && passed);
    }
}

/// The policy loss with the data's own advantages and old log-probs (the second pass).
#[derive(Debug, Clone, Default, Serialize)]
pub struct DataPass {
    /// The loss's value averaged over batches.
    pub value: Option<f64>,
    /// Sequence |weight| ∝ length^exponent under the data's advantages.
    pub sequence_weight_exponent: Option<f64>,
    /// Rows (first 64), each with its mean advantage and its weight under the data.
    pub sequences: Vec<DataSequence>,
    /// The first record of the first batch whose loss on the data was not finite.
    pub non_finite_line: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataSequence {
    pub line: usize,
    pub length: usize,
    pub advantage: f64,
    /// Σ −∂loss/∂logprob over the row's response tokens.
    pub sequence_weight: f64,
}

/// What `user_loss.policy` holds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PolicyReport {
    /// `policy` (rollouts) or `preference` (chosen/rejected pairs).
    pub kind: &'static str,
    /// The classification of the probe's weights (aggregation, constant, length bias).
    #[serde(flatten)]
    pub classification: Classification,
    /// `--expect-aggregation`, when given.
    pub expected_aggregation: Option<Aggregation>,
    /// For a preference loss: whether it `sum`s or `mean`s each sequence's log-probs.
    pub preference_logps: Option<&'static str>,
    /// The worst batch's share of |weight| on masked targets (prompt, tool output, padding),
    /// and on padding alone.
    pub max_masked_share: f64,
    pub max_padding_share: f64,
    /// NaN at masked positions (log-probs, old and reference log-probs, per-token advantages).
    pub nan_probe: PolicyProbe,
    /// Padding columns appended: the weights of the real tokens must not move.
    pub padding_probe: PolicyProbe,
    pub data_pass: Option<DataPass>,
    /// Probe rows (first 64): length, per-token and sequence weight.
    pub sequences: Vec<RowWeight>,
    /// `--accum`/`--world-size`: each step's total weight against one batch's.
    pub steps: Vec<PolicyStep>,
    /// Batches of the probe.
    pub batches: u64,
}

/// Rows kept in the report.
pub const REPORT_ROWS: usize = 64;

/// How a preference loss reduces each sequence's log-probs: `sum` (per-token weights equal in
/// every row), `mean` (each row's weights sum to the same), or None.
pub fn preference_logps(batches: &[BatchShape]) -> (Option<&'static str>, String) {
    let batches: Vec<&BatchShape> = batches.iter().filter(|b| !b.rows.is_empty()).collect();
    if batches.is_empty() {
        return (None, "no trained response token".into());
    }
    if !batches.iter().any(|b| b.lengths_vary) {
        return (
            None,
            "every response has the same length: sum and mean cannot be told apart".into(),
        );
    }
    let varying = || batches.iter().filter(|b| b.lengths_vary);
    if varying().all(|b| matches!(b.shape, Shape::Uniform(_))) {
        (Some("sum"), String::new())
    } else if varying().all(|b| matches!(b.shape, Shape::InverseLength(_))) {
        (Some("mean"), String::new())
    } else {
        (
            None,
            "the log-probs are neither summed nor averaged over each response".into(),
        )
    }
}

/// The findings of a policy or preference audit.
///
/// Long because each finding's message is written out where its condition is.
pub fn findings(r: &PolicyReport) -> Vec<crate::findings::Finding> {
    use crate::findings::{Code, Finding, Severity};
    let mut out = vec![];
    let c = &r.classification;
    let records = |line: Option<usize>| line.map(|l| vec![l]).unwrap_or_default();
    if r.max_masked_share > LEAK_SHARE {
        out.push(Finding::new(
            Code::PolicyTrainsMasked,
            Severity::Error,
            format!(
                "{:.2}% of your loss's weight falls on tokens the response mask excludes ({:.2}% on padding): prompt, tool-output or padding log-probs are trained",
                r.max_masked_share * 100.0,
                r.max_padding_share * 100.0
            ),
        ));
    }
    // An error only where the data's own NaN reaches the loss; a loss that would let NaN
    // through but gets finite masked values (trl's own GRPO code) is a warning.
    let fix = "NaN × 0 is NaN, so mask by selection (torch.where, masked_fill) before multiplying";
    if let Some(line) = r.data_pass.as_ref().and_then(|d| d.non_finite_line) {
        out.push(
            Finding::new(
                Code::PolicyNanThroughMask,
                Severity::Error,
                format!("your loss is not finite on the data's own rollouts: the NaN they carry (null old or reference log-probs, NaN advantages) reaches it; {fix}"),
            )
            .with_records(vec![line]),
        );
    } else if r.nan_probe.passed == Some(false) {
        out.push(
            Finding::new(
                Code::PolicyNanThroughMask,
                Severity::Warning,
                format!("a NaN at a masked position would reach your loss ({}); this data's masked positions are finite, so its loss is too, but rollouts that leave them undefined would make it NaN: {fix}", r.nan_probe.note),
            )
            .with_records(records(r.nan_probe.line)),
        );
    }
    if r.kind == "policy" && c.aggregation.is_none() {
        let squared = c.sequence_weight_exponent.is_some_and(|e| e > 1.5);
        let severity = if squared {
            Severity::Error
        } else {
            Severity::Warning
        };
        out.push(Finding::new(
            Code::PolicyAggregationUnrecognised,
            severity,
            format!(
                "your loss's weights match none of token_mean, seq_mean_token_mean, seq_mean_token_sum, seq_mean_token_sum_norm: {}; sequence weight {}",
                c.note, c.length_bias
            ),
        ));
    }
    if let (Some(want), Some(got)) = (r.expected_aggregation, c.aggregation) {
        if want != got {
            out.push(Finding::new(
                Code::PolicyAggregationMismatch,
                Severity::Error,
                format!(
                    "--expect-aggregation {} but your loss computes {} (sequence weight {})",
                    want.name(),
                    got.name(),
                    c.length_bias
                ),
            ));
        }
    } else if let (Some(want), None) = (r.expected_aggregation, c.aggregation) {
        out.push(Finding::new(
            Code::PolicyAggregationMismatch,
            Severity::Error,
            format!(
                "--expect-aggregation {} but your loss's aggregation was not recognised",
                want.name()
            ),
        ));
    }
    if r.padding_probe.passed == Some(false) {
        let preference = r.kind == "preference";
        out.push(
            Finding::new(
                Code::PolicyPaddingInStatistic,
                if preference { Severity::Error } else { Severity::Warning },
                if preference {
                    "appending padding columns changes your preference loss's weights: padding enters its per-sequence log-prob statistic (a mean over the padded length)".to_string()
                } else {
                    "appending padding columns changes your loss's weights: its normaliser follows the padded length, so the same rollout weighs differently in another batch".to_string()
                },
            )
            .with_records(records(r.padding_probe.line)),
        );
    }
    let off: Vec<&PolicyStep> = r
        .steps
        .iter()
        .filter(|s| s.ratio().is_some_and(|x| !close(x, 1.0)))
        .collect();
    if let Some(worst) = off.iter().max_by(|a, b| {
        let d = |s: &PolicyStep| (s.ratio().unwrap_or(1.0).ln()).abs();
        d(a).total_cmp(&d(b))
    }) {
        out.push(
            Finding::new(
                Code::PolicyStepMisnormalised,
                Severity::Error,
                format!(
                    "step {}'s tokens weigh {:.4}× what the same loss gives them in one batch: an extra division by the accumulation steps shows as 1/K, a count that ignores num_items_in_batch as K",
                    worst.index,
                    worst.ratio().unwrap_or(1.0)
                ),
            )
            .with_records(vec![worst.line]),
        );
    }
    out
}
