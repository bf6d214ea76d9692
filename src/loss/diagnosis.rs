//! Which formula does the user's loss compute?
//!
//! Pure code. For every batch, the user's scalar is compared with candidate formulas
//! ("hypotheses") computed from the same per-token cross-entropies: the correct masked token
//! mean and the aggregates that common masking and normalisation bugs produce (DOMAIN.md). A
//! hypothesis matches when it agrees with the user's value within a relative tolerance on
//! every batch where it is defined. The invariance probes (run by `loss::user`) settle what the
//! batches alone cannot tell apart.

use serde::Serialize;

use crate::findings::{Code, Finding, Severity};
use crate::loss::aggregate::BatchSums;

/// Default `--rtol`. A float32 loss summed over ~10⁵ tokens carries a relative rounding error
/// of about 10⁻⁶–10⁻⁵; 10⁻⁴ leaves headroom while still separating formulas that differ by
/// more than 0.01%. Raise it for half-precision losses.
pub const DEFAULT_RTOL: f64 = 1e-4;

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

#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    compared: u64,
    sum: f64,
    max_relative_error: f64,
}

impl Tally {
    fn matches(&self, rtol: f64) -> bool {
        self.compared > 0 && self.max_relative_error <= rtol
    }
}

/// Running comparison of the user's loss with every hypothesis.
#[derive(Debug, Clone)]
pub struct Diagnosis {
    rtol: f64,
    user_sum: f64,
    tallies: [Tally; 7],
}

impl Diagnosis {
    pub fn new(rtol: f64) -> Self {
        Self {
            rtol,
            user_sum: 0.0,
            tallies: [Tally::default(); 7],
        }
    }

    /// The masked token mean's tally: it is defined on exactly the batches that are compared.
    fn reference(&self) -> &Tally {
        &self.tallies[Hypothesis::MaskedTokenMean.index()]
    }

    /// Records one batch. Batches where nothing is trained are skipped: every mean is 0/0 there.
    pub fn observe(&mut self, user: f64, hypotheses: &[Option<f64>; 7]) {
        if hypotheses[Hypothesis::MaskedTokenMean.index()].is_none() {
            return;
        }
        self.user_sum += user;
        for (tally, value) in self.tallies.iter_mut().zip(hypotheses) {
            if let Some(value) = *value {
                tally.compared += 1;
                tally.sum += value;
                tally.max_relative_error =
                    tally.max_relative_error.max(relative_error(user, value));
            }
        }
    }

    pub fn batches(&self) -> u64 {
        self.reference().compared
    }

    /// The hypotheses that match on every batch where they were compared.
    pub fn matching(&self) -> Vec<Hypothesis> {
        Hypothesis::ALL
            .iter()
            .copied()
            .filter(|h| self.tallies[h.index()].matches(self.rtol))
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
                    matches: t.matches(self.rtol),
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
    pub matches: bool,
}

/// What an invariance probe saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProbeResult {
    pub ran: bool,
    pub batches: u64,
    /// Largest |changed − original| / |original| over the probed batches.
    pub max_relative_change: Option<f64>,
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

    pub fn record(&mut self, original: f64, changed: f64) {
        self.ran = true;
        self.batches += 1;
        let change = relative_error(changed, original);
        self.max_relative_change = Some(self.max_relative_change.unwrap_or(0.0).max(change));
    }

    pub fn finish(&mut self, rtol: f64) {
        if self.ran {
            self.passed = self.max_relative_change.map(|c| c <= rtol);
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

/// Narrows the matching hypotheses with the padding probe: when appended padding moves the
/// loss, only padding-dependent formulas remain, and the other way round.
pub fn conclude(diagnosis: &Diagnosis, padding: &ProbeResult) -> Conclusion {
    if diagnosis.batches() == 0 {
        return Conclusion::NoBatches;
    }
    let mut candidates = diagnosis.matching();
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
    let user = diagnosis.user_mean().unwrap_or(f64::NAN);
    let reference = diagnosis.reference_mean().unwrap_or(f64::NAN);
    let gap = crate::loss::aggregate::relative_difference(user, reference) * 100.0;
    match conclusion {
        Conclusion::Matched(Hypothesis::MaskedTokenMean) => format!(
            "your loss is {}: {user:.4} (mean over {} batches)",
            Hypothesis::MaskedTokenMean.phrase(),
            diagnosis.batches()
        ),
        Conclusion::Matched(h) => format!(
            "your loss is {}: {user:.4} where the masked token mean is {reference:.4}, {gap:+.1}%",
            h.phrase()
        ),
        Conclusion::Ambiguous(hs) => format!(
            "your loss matches {} equally on this data: they cannot be told apart here (the probes below decide)",
            names(hs)
        ),
        Conclusion::NoMatch { closest } => match closest {
            Some((h, err)) => format!(
                "your loss matches no known formula: {user:.4} where the masked token mean is {reference:.4}; closest is {} ({:.2}% off at worst)",
                h.name(),
                err * 100.0
            ),
            None => "your loss matches no known formula".to_string(),
        },
        Conclusion::NoBatches => {
            "your loss was not compared: no batch has a trained target".to_string()
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
                "appending padding columns moved your loss by {:.3}% (tolerance {:.3}%): padding enters it",
                padding.max_relative_change.unwrap_or(0.0) * 100.0,
                diagnosis.rtol() * 100.0
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
        let mut d = Diagnosis::new(1e-4);
        d.observe(user, &batch());
        d
    }

    #[test]
    fn each_formula_is_recognised() {
        for h in Hypothesis::ALL {
            let value = batch()[h.index()].unwrap();
            let d = diagnose(value * (1.0 + 1e-6));
            assert_eq!(
                conclude(&d, &ProbeResult::default()),
                Conclusion::Matched(h),
                "{h:?}"
            );
        }
    }

    #[test]
    fn nothing_matches_and_the_closest_is_named() {
        let d = diagnose(2.5 * 1.05);
        match conclude(&d, &ProbeResult::default()) {
            Conclusion::NoMatch {
                closest: Some((h, err)),
            } => {
                assert_eq!(h, Hypothesis::MaskedTokenMean);
                assert!((err - 0.05).abs() < 1e-9);
            }
            other => panic!("{other:?}"),
        }
        let f = findings(
            &conclude(&d, &ProbeResult::default()),
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
        let mut d = Diagnosis::new(1e-4);
        d.observe(2.0, &hyps);
        let all = vec![
            Hypothesis::MaskedTokenMean,
            Hypothesis::AllPositionsMean,
            Hypothesis::MaskedSumOverAllPositions,
            Hypothesis::SequenceMean,
        ];
        assert_eq!(d.matching(), all);
        assert_eq!(
            conclude(&d, &ProbeResult::default()),
            Conclusion::Ambiguous(all.clone())
        );
        // Padding moved the loss: only the formulas that count padding remain.
        let mut moved = ProbeResult::default();
        moved.record(2.0, 1.0);
        moved.finish(1e-4);
        assert_eq!(
            conclude(&d, &moved),
            Conclusion::Ambiguous(vec![
                Hypothesis::AllPositionsMean,
                Hypothesis::MaskedSumOverAllPositions
            ])
        );
        let mut still = ProbeResult::default();
        still.record(2.0, 2.0);
        still.finish(1e-4);
        // Token mean and sequence mean both ignore padding: still ambiguous, and said so.
        let c = conclude(&d, &still);
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
        padding.record(2.5, 2.0);
        padding.finish(1e-4);
        let mut leak = ProbeResult::default();
        leak.record(2.5, 2.5);
        leak.finish(1e-4);
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
