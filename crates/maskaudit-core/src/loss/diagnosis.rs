//! Which formula does the user's loss compute?
//!
//! Pure code. For every batch, the user's scalar is compared with candidate formulas
//! ("hypotheses") computed from the same per-token cross-entropies: the correct masked token
//! mean and the aggregates that common masking and normalisation bugs produce (the formula
//! table of docs/guide.md). A
//! hypothesis matches when it agrees with the user's value within its tolerance on every batch
//! where it is defined. The tolerance is derived, not fixed: each formula applied to the
//! per-position float32 rounding bounds (`loss::weights::log_softmax_error`) gives how far a
//! correct float32 loss may stray from it (so a confident model, whose losses are far below
//! the rounding of its logits, is not called wrong), plus the rounding of the sum itself and
//! the user's `--rtol`. The invariance probes (run by `loss::user`) and the gradient's weights
//! settle what the batches alone cannot tell apart.

use serde::Serialize;

use crate::findings::{Code, Finding, Severity};
use crate::loss::aggregate::BatchSums;

/// Default `--rtol`: no slack beyond the derived float32 tolerance. Raise it for a loss that
/// computes in half precision.
pub const DEFAULT_RTOL: f64 = 0.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hypothesis {
    /// Σℓm / Σm: correct.
    MaskedTokenMean,
    /// Σℓ / N, padding included.
    AllPositionsMean,
    /// Σℓm / N.
    MaskedSumOverAllPositions,
    /// Mean over rows of Σℓm / Σm.
    SequenceMean,
    /// Masked token mean with targets one position further (input_ids[t+2]).
    DoubleShift,
    /// Masked token mean with targets one position nearer (input_ids[t]).
    MissingShift,
    /// Σℓm.
    MaskedSum,
}

impl Hypothesis {
    pub const ALL: [Hypothesis; 7] = [
        Hypothesis::MaskedTokenMean,
        Hypothesis::AllPositionsMean,
        Hypothesis::MaskedSumOverAllPositions,
        Hypothesis::SequenceMean,
        Hypothesis::DoubleShift,
        Hypothesis::MissingShift,
        Hypothesis::MaskedSum,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hypothesis::MaskedTokenMean => "masked_token_mean",
            Hypothesis::AllPositionsMean => "all_positions_mean",
            Hypothesis::MaskedSumOverAllPositions => "masked_sum_over_all_positions",
            Hypothesis::SequenceMean => "sequence_mean",
            Hypothesis::DoubleShift => "double_shift_token_mean",
            Hypothesis::MissingShift => "unshifted_token_mean",
            Hypothesis::MaskedSum => "masked_sum",
        }
    }

    /// How the verdict sentence names the formula.
    pub fn phrase(self) -> &'static str {
        match self {
            Hypothesis::MaskedTokenMean => "the masked token mean Σℓm/Σm, which is correct",
            Hypothesis::AllPositionsMean => "the mean over all positions, padding included",
            Hypothesis::MaskedSumOverAllPositions => {
                "the masked sum divided by all positions, padding in the denominator"
            }
            Hypothesis::SequenceMean => "the mean of per-row means, which weighs short rows up",
            Hypothesis::DoubleShift => {
                "the token mean against the token after next: the targets are shifted twice"
            }
            Hypothesis::MissingShift => {
                "the token mean against the current token: the targets are not shifted"
            }
            Hypothesis::MaskedSum => "the masked sum, never normalised",
        }
    }

    /// Whether appending padding changes this formula's value (N grows, Σm does not).
    pub fn depends_on_padding(self) -> bool {
        matches!(
            self,
            Hypothesis::AllPositionsMean | Hypothesis::MaskedSumOverAllPositions
        )
    }

    /// Position in [`Hypothesis::ALL`] and in [`batch_hypotheses`]' result: `ALL` lists the
    /// variants in the order they are declared (a unit test holds it to that).
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One batch's per-token losses for the three alignments, each with its aligned mask
/// (row-major, `rows × positions`); the real next-token alignment as the sums the dataset's
/// totals already took of it.
pub struct BatchLosses<'a> {
    pub rows: usize,
    /// Targets input_ids[t+1]: the real next-token losses, summed.
    pub next: BatchSums,
    /// Targets input_ids[t].
    pub unshifted: (&'a [f32], &'a [u8]),
    /// Targets input_ids[t+2].
    pub double_shifted: (&'a [f32], &'a [u8]),
}

/// The value of every hypothesis on one batch; `None` where it is undefined (nothing trained).
pub fn batch_hypotheses(b: &BatchLosses) -> [Option<f64>; 7] {
    let next = b.next;
    let unshifted = BatchSums::of(b.unshifted.0, b.unshifted.1, b.rows);
    let double = BatchSums::of(b.double_shifted.0, b.double_shifted.1, b.rows);
    let trained = next.trained > 0;
    let n = next.positions as f64;
    let mut out = [None; 7];
    out[Hypothesis::MaskedTokenMean.index()] = next.masked_token_mean();
    out[Hypothesis::AllPositionsMean.index()] = trained.then(|| next.loss_sum / n);
    out[Hypothesis::MaskedSumOverAllPositions.index()] = trained.then(|| next.masked_loss_sum / n);
    out[Hypothesis::SequenceMean.index()] =
        (next.rows_trained > 0).then(|| next.row_mean_sum / next.rows_trained as f64);
    out[Hypothesis::DoubleShift.index()] = double.masked_token_mean();
    out[Hypothesis::MissingShift.index()] = unshifted.masked_token_mean();
    out[Hypothesis::MaskedSum.index()] = trained.then_some(next.masked_loss_sum);
    out
}

/// Each hypothesis's absolute tolerance on one batch: the formulas applied to `errors` (the
/// per-position rounding bounds, `loss::weights::log_softmax_error`, aligned like the losses),
/// plus the rounding of a float32 sum over the batch's `positions`, relative to each `value`.
pub fn tolerances(
    errors: &BatchLosses,
    values: &[Option<f64>; 7],
    positions: usize,
) -> [Option<f64>; 7] {
    use crate::loss::weights::{F32_UNIT, ROUNDING_SAFETY};
    let summation = ROUNDING_SAFETY * F32_UNIT * (positions.max(1) as f64).sqrt();
    let mut out = batch_hypotheses(errors);
    for (tolerance, value) in out.iter_mut().zip(values) {
        if let (Some(t), Some(v)) = (tolerance.as_mut(), value) {
            *t += summation * v.abs();
        }
    }
    out
}

/// |value − reference| / |reference|; infinite when the value is not finite.
pub fn relative_error(value: f64, reference: f64) -> f64 {
    if !value.is_finite() {
        return f64::INFINITY;
    }
    if value == reference {
        return 0.0;
    }
    (value - reference).abs() / reference.abs().max(f64::MIN_POSITIVE)
}

/// |value − reference| over an absolute tolerance, with `rtol` of the reference on top; 0 for
/// equal values, infinite when the value is not finite.
pub fn error_over_tolerance(value: f64, reference: f64, tolerance: f64, rtol: f64) -> f64 {
    if !value.is_finite() {
        return f64::INFINITY;
    }
    if value == reference {
        return 0.0;
    }
    (value - reference).abs() / (tolerance + rtol * reference.abs()).max(f64::MIN_POSITIVE)
}

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    compared: u64,
    sum: f64,
    max_relative_error: f64,
    /// The largest [`error_over_tolerance`]: at most 1 on every batch for a match.
    max_excess: f64,
    /// The largest tolerance relative to the formula's value.
    max_relative_tolerance: f64,
}

impl Tally {
    fn matches(&self) -> bool {
        self.compared > 0 && self.max_excess <= 1.0
    }
}

/// Running comparison of the user's loss with every hypothesis.
#[derive(Debug, Clone)]
pub struct Diagnosis {
    rtol: f64,
    /// What the sentences call the loss: "your loss", "the trainer's loss".
    subject: &'static str,
    user_sum: f64,
    tallies: [Tally; 7],
}

impl Diagnosis {
    pub fn new(rtol: f64) -> Self {
        Self {
            rtol,
            subject: "your loss",
            user_sum: 0.0,
            tallies: [Tally::default(); 7],
        }
    }

    /// The same comparison, its sentences naming the loss `subject`.
    pub fn with_subject(mut self, subject: &'static str) -> Self {
        self.subject = subject;
        self
    }

    /// The masked token mean's tally: it is defined on exactly the batches that are compared.
    fn reference(&self) -> &Tally {
        &self.tallies[Hypothesis::MaskedTokenMean.index()]
    }

    /// Records one batch: the value of each hypothesis and its absolute tolerance (see the
    /// module's doc). Batches where nothing is trained are skipped: every mean is 0/0 there.
    pub fn observe(
        &mut self,
        user: f64,
        hypotheses: &[Option<f64>; 7],
        tolerances: &[Option<f64>; 7],
    ) {
        if hypotheses[Hypothesis::MaskedTokenMean.index()].is_none() {
            return;
        }
        self.user_sum += user;
        for ((tally, value), tolerance) in self.tallies.iter_mut().zip(hypotheses).zip(tolerances) {
            if let Some(value) = *value {
                let tolerance = tolerance.unwrap_or(0.0);
                tally.compared += 1;
                tally.sum += value;
                tally.max_relative_error =
                    tally.max_relative_error.max(relative_error(user, value));
                tally.max_excess = tally
                    .max_excess
                    .max(error_over_tolerance(user, value, tolerance, self.rtol));
                let relative = tolerance / value.abs().max(f64::MIN_POSITIVE) + self.rtol;
                tally.max_relative_tolerance = tally.max_relative_tolerance.max(relative);
            }
        }
    }

    /// The largest tolerance the masked token mean was held to, relative to its value.
    pub fn max_relative_tolerance(&self) -> f64 {
        self.reference().max_relative_tolerance
    }

    pub fn batches(&self) -> u64 {
        self.reference().compared
    }

    /// The hypotheses that match on every batch where they were compared.
    pub fn matching(&self) -> Vec<Hypothesis> {
        Hypothesis::ALL
            .iter()
            .copied()
            .filter(|h| self.tallies[h.index()].matches())
            .collect()
    }

    pub fn summary(&self) -> Vec<HypothesisSummary> {
        Hypothesis::ALL
            .iter()
            .map(|&h| {
                let t = &self.tallies[h.index()];
                HypothesisSummary {
                    name: h.name(),
                    value: (t.compared > 0).then(|| t.sum / t.compared as f64),
                    max_relative_error: (t.compared > 0).then_some(t.max_relative_error),
                    max_error_over_tolerance: (t.compared > 0).then_some(t.max_excess),
                    matches: t.matches(),
                }
            })
            .collect()
    }

    /// The user's loss averaged over the compared batches.
    pub fn user_mean(&self) -> Option<f64> {
        let batches = self.batches();
        (batches > 0).then(|| self.user_sum / batches as f64)
    }

    /// The masked token mean averaged over the same batches, the same way.
    pub fn reference_mean(&self) -> Option<f64> {
        let t = self.reference();
        (t.compared > 0).then(|| t.sum / t.compared as f64)
    }

    /// The hypothesis with the smallest worst-case error, and that error.
    pub fn closest(&self) -> Option<(Hypothesis, f64)> {
        Hypothesis::ALL
            .iter()
            .filter(|h| self.tallies[h.index()].compared > 0)
            .map(|&h| (h, self.tallies[h.index()].max_relative_error))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    }

    pub fn max_relative_error(&self, h: Hypothesis) -> f64 {
        self.tallies[h.index()].max_relative_error
    }

    pub fn rtol(&self) -> f64 {
        self.rtol
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HypothesisSummary {
    pub name: &'static str,
    /// Mean over compared batches.
    pub value: Option<f64>,
    pub max_relative_error: Option<f64>,
    /// The worst batch's error over its tolerance: at most 1 for a match.
    pub max_error_over_tolerance: Option<f64>,
    pub matches: bool,
}

/// What an invariance probe saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProbeResult {
    pub ran: bool,
    pub batches: u64,
    /// Largest |changed − original| / |original| over the probed batches.
    pub max_relative_change: Option<f64>,
    /// The largest change over what float32 rounding allows on that batch (passes at ≤ 1).
    pub max_change_over_tolerance: Option<f64>,
    pub passed: Option<bool>,
    /// Why it did not run, or what it did.
    pub note: String,
}

impl ProbeResult {
    pub fn skipped(note: impl Into<String>) -> Self {
        Self {
            note: note.into(),
            ..Default::default()
        }
    }

    /// One batch's value before and after the probe changed it; `tolerance` is the batch's
    /// absolute tolerance for a correct loss, `rtol` the user's extra relative one.
    pub fn record(&mut self, original: f64, changed: f64, tolerance: f64, rtol: f64) {
        self.ran = true;
        self.batches += 1;
        let change = relative_error(changed, original);
        self.max_relative_change = Some(self.max_relative_change.unwrap_or(0.0).max(change));
        let excess = error_over_tolerance(changed, original, tolerance, rtol);
        self.max_change_over_tolerance =
            Some(self.max_change_over_tolerance.unwrap_or(0.0).max(excess));
    }

    pub fn finish(&mut self) {
        if self.ran {
            self.passed = self.max_change_over_tolerance.map(|c| c <= 1.0);
        }
    }
}

/// The conclusion: which formula, or which candidates, or none.
#[derive(Debug, Clone, PartialEq)]
pub enum Conclusion {
    Matched(Hypothesis),
    Ambiguous(Vec<Hypothesis>),
    NoMatch { closest: Option<(Hypothesis, f64)> },
    NoBatches,
}

/// What the gradient's weights say of a formula (`loss::weights`): whether the weights of
/// every batch are that formula's own, at scale 1.
pub trait WeightEvidence {
    /// `Some(true)`: the weights are exactly this formula's; `Some(false)`: they are not;
    /// `None`: no weight map, or none for this formula (a shifted target).
    fn follows(&self, h: Hypothesis) -> Option<bool>;
}

/// No weight map.
impl WeightEvidence for () {
    fn follows(&self, _: Hypothesis) -> Option<bool> {
        None
    }
}

/// Narrows the matching hypotheses. Among formulas whose values all match (a confident model's
/// losses all sit within rounding of 0), the weights decide when they name exactly one (or
/// none); else the padding probe: when appended padding moves the loss, only
/// padding-dependent formulas remain, and the other way round.
pub fn conclude(
    diagnosis: &Diagnosis,
    padding: &ProbeResult,
    weights: &dyn WeightEvidence,
) -> Conclusion {
    if diagnosis.batches() == 0 {
        return Conclusion::NoBatches;
    }
    let mut candidates = diagnosis.matching();
    if candidates.len() > 1 {
        let followed: Vec<Hypothesis> = candidates
            .iter()
            .copied()
            .filter(|&h| weights.follows(h) == Some(true))
            .collect();
        let decided = candidates.iter().all(|&h| weights.follows(h).is_some());
        if followed.len() == 1 {
            return Conclusion::Matched(followed[0]);
        }
        if decided && followed.is_empty() {
            return Conclusion::NoMatch {
                closest: diagnosis.closest(),
            };
        }
    }
    if candidates.len() > 1 {
        if let Some(passed) = padding.passed {
            let narrowed: Vec<Hypothesis> = candidates
                .iter()
                .copied()
                .filter(|h| h.depends_on_padding() != passed)
                .collect();
            if !narrowed.is_empty() {
                candidates = narrowed;
            }
        }
    }
    match candidates.len() {
        0 => Conclusion::NoMatch {
            closest: diagnosis.closest(),
        },
        1 => Conclusion::Matched(candidates[0]),
        _ => Conclusion::Ambiguous(candidates),
    }
}

/// The verdict sentence for people.
pub fn verdict_sentence(conclusion: &Conclusion, diagnosis: &Diagnosis) -> String {
    let subject = diagnosis.subject;
    let user = diagnosis.user_mean().unwrap_or(f64::NAN);
    let reference = diagnosis.reference_mean().unwrap_or(f64::NAN);
    let gap = crate::loss::aggregate::relative_change(user, reference) * 100.0;
    match conclusion {
        Conclusion::Matched(Hypothesis::MaskedTokenMean) => format!(
            "{subject} is {}: {user:.4} (mean over {} batches)",
            Hypothesis::MaskedTokenMean.phrase(),
            diagnosis.batches()
        ),
        Conclusion::Matched(h) => format!(
            "{subject} is {}: {user:.4} where the masked token mean is {reference:.4}, {gap:+.1}%",
            h.phrase()
        ),
        Conclusion::Ambiguous(hs) => format!(
            "{subject} matches {} equally on this data: they cannot be told apart here{}",
            names(hs),
            if subject == "your loss" {
                " (the probes below decide)"
            } else {
                ""
            }
        ),
        Conclusion::NoMatch { closest } => match closest {
            Some((h, err)) => format!(
                "{subject} matches no known formula: {user:.4} where the masked token mean is {reference:.4}; closest is {} ({:.2}% off at worst)",
                h.name(),
                err * 100.0
            ),
            None => format!("{subject} matches no known formula"),
        },
        Conclusion::NoBatches => {
            format!("{subject} was not compared: no batch has a trained target")
        }
    }
}

fn names(hs: &[Hypothesis]) -> String {
    hs.iter()
        .map(|h| h.name())
        .collect::<Vec<_>>()
        .join(" and ")
}

/// The finding a matched formula calls for (none for the token mean), its severity, and the
/// clause its message ends with.
fn matched(h: Hypothesis, sequence_gap: Option<f64>) -> (Option<Code>, Severity, String) {
    match h {
        Hypothesis::MaskedTokenMean => (None, Severity::Info, String::new()),
        Hypothesis::AllPositionsMean => (
            Some(Code::LossIncludesPadding),
            Severity::Error,
            "; likely causes: the reduction runs before the mask (F.cross_entropy's default reduction='mean'), pad labels are not set to the ignore index, or ignore_index does not match the labels (-1 vs -100)".to_string(),
        ),
        Hypothesis::MaskedSumOverAllPositions => (
            Some(Code::PaddingInDenominator),
            Severity::Error,
            "; divide by the mask's sum, not by numel() or the padded length".to_string(),
        ),
        Hypothesis::SequenceMean => (
            Some(Code::SequenceWeightedMean),
            Severity::Warning,
            match sequence_gap {
                Some(gap) => format!(
                    "; over the whole dataset the sequence mean is {:+.2}% from the token mean",
                    gap * 100.0
                ),
                None => String::new(),
            },
        ),
        Hypothesis::DoubleShift => (
            Some(Code::OffByOneShift),
            Severity::Error,
            "; the data or labels are already shifted and the loss shifts again".to_string(),
        ),
        Hypothesis::MissingShift => (
            Some(Code::OffByOneShift),
            Severity::Error,
            "; logits at t must be scored against the token at t+1".to_string(),
        ),
        Hypothesis::MaskedSum => (
            Some(Code::UnnormalizedSum),
            Severity::Warning,
            "; its scale follows the number of trained tokens in each batch".to_string(),
        ),
    }
}

/// Findings from the conclusion and the probes. `sequence_gap` is the dataset-level relative
/// distance of the sequence mean from the token mean.
pub fn findings(
    conclusion: &Conclusion,
    diagnosis: &Diagnosis,
    padding: &ProbeResult,
    masked_logits: &ProbeResult,
    sequence_gap: Option<f64>,
) -> Vec<Finding> {
    let sentence = verdict_sentence(conclusion, diagnosis);
    let mut out = vec![];
    match conclusion {
        Conclusion::Matched(h) => {
            let (code, severity, why) = matched(*h, sequence_gap);
            if let Some(code) = code {
                out.push(Finding::new(code, severity, format!("{sentence}{why}")));
            }
        }
        Conclusion::Ambiguous(_) => {
            out.push(Finding::new(
                Code::LossAmbiguous,
                Severity::Warning,
                sentence,
            ));
        }
        Conclusion::NoMatch { .. } => {
            out.push(Finding::new(Code::LossMismatch, Severity::Error, sentence));
        }
        Conclusion::NoBatches => {}
    }
    if padding.passed == Some(false) {
        out.push(Finding::new(
            Code::PaddingVariance,
            Severity::Error,
            format!(
                "appending padding columns moved your loss by {:.3}% ({:.3e}× what float32 rounding allows): padding enters it",
                padding.max_relative_change.unwrap_or(0.0) * 100.0,
                padding.max_change_over_tolerance.unwrap_or(0.0)
            ),
        ));
    }
    if masked_logits.passed == Some(false) {
        out.push(Finding::new(
            Code::MaskedLogitsLeak,
            Severity::Error,
            format!(
                "randomising the logits at untrained positions moved your loss by {:.3}%: positions the mask excludes still reach it",
                masked_logits.max_relative_change.unwrap_or(0.0) * 100.0
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two rows of 3 next-token positions; row 2 is half padding.
    fn batch() -> [Option<f64>; 7] {
        let next = [1.0, 2.0, 3.0, 4.0, 0.5, 0.5];
        let next_mask = [1, 1, 1, 1, 0, 0];
        let unshifted = [9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0];
        let unshifted_mask = [1, 1, 1, 1, 1, 1, 0, 0];
        let double = [7.0, 7.0, 7.0, 7.0];
        let double_mask = [1, 1, 0, 0];
        batch_hypotheses(&BatchLosses {
            rows: 2,
            next: BatchSums::of(&next, &next_mask, 2),
            unshifted: (&unshifted, &unshifted_mask),
            double_shifted: (&double, &double_mask),
        })
    }

    #[test]
    fn index_is_the_position_in_all() {
        for (i, h) in Hypothesis::ALL.iter().enumerate() {
            assert_eq!(h.index(), i, "{h:?}");
        }
    }

    #[test]
    fn hypotheses_follow_their_formulas() {
        let h = batch();
        assert_eq!(h[Hypothesis::MaskedTokenMean.index()], Some(10.0 / 4.0));
        assert_eq!(h[Hypothesis::AllPositionsMean.index()], Some(11.0 / 6.0));
        assert_eq!(
            h[Hypothesis::MaskedSumOverAllPositions.index()],
            Some(10.0 / 6.0)
        );
        assert_eq!(h[Hypothesis::SequenceMean.index()], Some((2.0 + 4.0) / 2.0));
        assert_eq!(h[Hypothesis::DoubleShift.index()], Some(7.0));
        assert_eq!(h[Hypothesis::MissingShift.index()], Some(9.0));
        assert_eq!(h[Hypothesis::MaskedSum.index()], Some(10.0));
    }

    fn diagnose(user: f64) -> Diagnosis {
        let mut d = Diagnosis::new(0.0);
        d.observe(user, &batch(), &tolerances(&batch(), 1e-4));
        d
    }

    /// A relative tolerance as the absolute one `observe` takes.
    fn tolerances(values: &[Option<f64>; 7], rtol: f64) -> [Option<f64>; 7] {
        values.map(|v| v.map(|v| v.abs() * rtol))
    }

    #[test]
    fn each_formula_is_recognised() {
        for h in Hypothesis::ALL {
            let value = batch()[h.index()].unwrap();
            let d = diagnose(value * (1.0 + 1e-6));
            assert_eq!(
                conclude(&d, &ProbeResult::default(), &()),
                Conclusion::Matched(h),
                "{h:?}"
            );
        }
    }

    #[test]
    fn nothing_matches_and_the_closest_is_named() {
        let d = diagnose(2.5 * 1.05);
        match conclude(&d, &ProbeResult::default(), &()) {
            Conclusion::NoMatch {
                closest: Some((h, err)),
            } => {
                assert_eq!(h, Hypothesis::MaskedTokenMean);
                assert!((err - 0.05).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
        let f = findings(
            &conclude(&d, &ProbeResult::default(), &()),
            &d,
            &ProbeResult::default(),
            &ProbeResult::default(),
            None,
        );
        assert_eq!(f[0].code, Code::LossMismatch);
        assert!(f[0].message.contains("closest is masked_token_mean"));
    }

    #[test]
    fn the_padding_probe_settles_indistinguishable_formulas() {
        // No padding at all: the all-positions mean equals the masked mean.
        let losses = [1.0, 3.0];
        let mask = [1, 1];
        let hyps = batch_hypotheses(&BatchLosses {
            rows: 1,
            next: BatchSums::of(&losses, &mask, 1),
            unshifted: (&[5.0, 5.0, 5.0], &[1, 1, 1]),
            double_shifted: (&[8.0], &[1]),
        });
        let mut d = Diagnosis::new(0.0);
        d.observe(2.0, &hyps, &tolerances(&hyps, 1e-4));
        let all = vec![
            Hypothesis::MaskedTokenMean,
            Hypothesis::AllPositionsMean,
            Hypothesis::MaskedSumOverAllPositions,
            Hypothesis::SequenceMean,
        ];
        assert_eq!(d.matching(), all);
        assert_eq!(
            conclude(&d, &ProbeResult::default(), &()),
            Conclusion::Ambiguous(all.clone())
        );
        // Padding moved the loss: only the formulas that count padding remain.
        let mut moved = ProbeResult::default();
        moved.record(2.0, 1.0, 2e-4, 0.0);
        moved.finish();
        assert_eq!(
            conclude(&d, &moved, &()),
            Conclusion::Ambiguous(vec![
                Hypothesis::AllPositionsMean,
                Hypothesis::MaskedSumOverAllPositions
            ])
        );
        let mut still = ProbeResult::default();
        still.record(2.0, 2.0, 2e-4, 0.0);
        still.finish();
        // Token mean and sequence mean both ignore padding: still ambiguous, and said so.
        let c = conclude(&d, &still, &());
        assert_eq!(
            c,
            Conclusion::Ambiguous(vec![Hypothesis::MaskedTokenMean, Hypothesis::SequenceMean])
        );
        let f = findings(&c, &d, &still, &ProbeResult::default(), None);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].code, Code::LossAmbiguous);
    }

    #[test]
    fn probes_turn_into_findings() {
        let d = diagnose(2.5);
        let mut padding = ProbeResult::default();
        padding.record(2.5, 2.0, 2.5e-4, 0.0);
        padding.finish();
        let mut leak = ProbeResult::default();
        leak.record(2.5, 2.5, 2.5e-4, 0.0);
        leak.finish();
        let f = findings(
            &Conclusion::Matched(Hypothesis::MaskedTokenMean),
            &d,
            &padding,
            &leak,
            None,
        );
        assert_eq!(f.len(), 1);
        assert_eq!(
            (f[0].code, f[0].severity),
            (Code::PaddingVariance, Severity::Error)
        );
        assert!(f[0].message.contains("20.000%"), "{}", f[0].message);
    }

    #[test]
    fn non_finite_user_values_never_match() {
        let d = diagnose(f64::NAN);
        assert!(d.matching().is_empty());
    }
}
