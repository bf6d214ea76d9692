//! A captured training run (`data::capture`) checked against what its trainer said: batched
//! micro-batch by micro-batch as the trainer did, each step's `num_items_in_batch` against
//! the trained targets of its micro-batches, and the trainer's loss turned back into a token
//! mean beside maskaudit's.

use std::collections::BTreeMap;

use crate::data::batch::Batch;
use crate::data::capture::{Capture, CaptureSummary, LoggedStep};
use crate::findings::{Code, Finding, Severity};
use maskaudit_core::loss::aggregate::BatchSums;
use maskaudit_core::loss::diagnosis::{
    self, batch_hypotheses, BatchLosses, Conclusion, Diagnosis, Hypothesis, ProbeResult,
};
use maskaudit_core::loss::weights;

/// The logits' magnitude the trainer's tolerance assumes: the capture holds no logits, and a
/// language model's stay far below it.
const ASSUMED_LOGIT_BOUND: f64 = 100.0;

/// One batch's next-token sums, and the same formulas applied to each position's rounding
/// bound: what the trainer's loss is held against.
#[derive(Debug, Clone, Copy)]
pub(super) struct TrainerBatch {
    rows: usize,
    /// Padding targets the mask trains.
    padding_trained: u64,
    positions: usize,
    sums: BatchSums,
    errors: BatchSums,
}

impl TrainerBatch {
    /// From the batch's per-token losses and target mask (`[B, T-1]`) and their sums.
    pub(super) fn of(
        batch: &Batch,
        losses: &[f32],
        mask: &[u8],
        sums: BatchSums,
        vocab: i64,
    ) -> Self {
        let v = usize::try_from(vocab).unwrap_or(1);
        let ln_v = (v as f64).ln();
        let errors: Vec<f32> = losses
            .iter()
            .map(|&l| {
                let bound = ASSUMED_LOGIT_BOUND;
                weights::log_softmax_error(bound + ln_v, bound, v, f64::from(l)) as f32
            })
            .collect();
        Self {
            rows: batch.rows,
            padding_trained: batch.target_counts().padding_trained,
            positions: losses.len(),
            sums,
            errors: BatchSums::of(&errors, mask, batch.rows),
        }
    }
}

/// The capture and what `check` counted of each of its micro-batches.
pub(super) struct Captured {
    capture: Capture,
    /// Trained next-token targets of each batch run, in order.
    trained: Vec<u64>,
}

impl Captured {
    pub(super) fn new(capture: Capture) -> Self {
        Self {
            capture,
            trained: vec![],
        }
    }

    /// The rows of each captured micro-batch: the run's batches.
    pub(super) fn batch_sizes(&self) -> Vec<usize> {
        self.capture.batch_sizes()
    }

    pub(super) fn observe(&mut self, batch: &Batch) {
        self.trained.push(batch.target_counts().trained);
    }

    /// Whether the trainer divided each micro-batch's loss by `num_items_in_batch` (the model
    /// takes the loss kwargs, or a `compute_loss_func`; or a plain loop passed it to every
    /// forward), rather than by its own count.
    fn normalised_by_step(&self) -> bool {
        let forward_counted = self.capture.settings["source"] == "forward"
            && self
                .capture
                .micro_batches
                .iter()
                .all(|m| m.num_items.is_some());
        self.capture.setting("model_accepts_loss_kwargs")
            || self.capture.setting("compute_loss_func")
            || forward_counted
    }

    /// Whether `num_items_in_batch` counts every rank's targets (then one file cannot check it).
    fn count_is_global(&self) -> bool {
        self.capture.world_size() > 1 && self.capture.setting("average_tokens_across_devices")
    }

    /// What `average_tokens_across_devices` multiplies a loss divided by the global count by
    /// (the world size), so that the ranks' averaged gradients are the global token mean.
    fn token_scale(&self) -> f64 {
        if self.capture.setting("average_tokens_across_devices") {
            self.capture.world_size().max(1) as f64
        } else {
            1.0
        }
    }

    /// Per (rank, step): the trained targets of its micro-batches and the trainer's count.
    fn steps(&self) -> BTreeMap<(i64, i64), (u64, Option<f64>)> {
        let mut steps: BTreeMap<(i64, i64), (u64, Option<f64>)> = BTreeMap::new();
        for (micro, &trained) in self.capture.micro_batches.iter().zip(&self.trained) {
            let entry = steps.entry((micro.rank, micro.step)).or_default();
            entry.0 = entry.0.saturating_add(trained);
            entry.1 = entry.1.or(micro.num_items);
        }
        steps
    }

    pub(super) fn summary(&self) -> CaptureSummary {
        let steps = self.steps();
        let by_step = self.normalised_by_step();
        let scale = self.token_scale();
        let (mut total, mut trained, mut complete) = (0.0, 0u64, true);
        for (micro, &n) in self.capture.micro_batches.iter().zip(&self.trained) {
            let normaliser = match (by_step, micro.num_items) {
                (true, Some(items)) => items / scale,
                (true, None) | (false, _) => n as f64,
            };
            match micro.trainer_loss {
                Some(loss) if n > 0 => total += loss * normaliser,
                Some(_) => {}
                None => complete = false,
            }
            trained = trained.saturating_add(n);
        }
        CaptureSummary {
            source: self.capture.settings["source"]
                .as_str()
                .unwrap_or("trainer")
                .to_string(),
            micro_batches: self.capture.micro_batches.len() as u64,
            steps: steps.len() as u64,
            counts_compared: if self.count_is_global() {
                0
            } else {
                steps.values().filter(|(_, items)| items.is_some()).count() as u64
            },
            trainer_token_mean: (complete && trained > 0).then(|| total / trained as f64),
            trainer_verdict: None,
            logged_steps: vec![],
        }
    }

    /// The trainer's loss of every micro-batch against the next-token formulas, as `--loss`
    /// holds a loss file's: which one the trainer computes, read both ways a trainer may
    /// normalise it (by the step's `num_items_in_batch`, or per micro-batch), and what that
    /// does to the step given how the trainer then accumulates. `batches` are the run's, in
    /// order. The tolerance is the derived one plus 1e-4 relative: fused and chunked loss
    /// kernels (trl's fused LM head) round differently from a plain cross-entropy.
    pub(super) fn trainer_findings(
        &self,
        batches: &[TrainerBatch],
    ) -> (Option<String>, Vec<Finding>) {
        let (verdict, findings) = self.trainer_formula(batches);
        let trained_padding: u64 = batches.iter().map(|b| b.padding_trained).sum();
        // The formulas are over the mask as the batches give it: a mask that trains padding
        // makes even the token mean include it.
        let verdict = verdict.map(|v| {
            if trained_padding > 0 {
                format!("{v}; but its mask trains {trained_padding} padding targets, so the loss includes padding (see padding-trained)")
            } else {
                v
            }
        });
        (verdict, findings)
    }

    fn trainer_formula(&self, batches: &[TrainerBatch]) -> (Option<String>, Vec<Finding>) {
        if batches.len() != self.capture.micro_batches.len()
            || self
                .capture
                .micro_batches
                .iter()
                .any(|m| m.trainer_loss.is_none())
        {
            return (None, vec![]);
        }
        let by_step = self.normalised_by_step();
        let has_items = self
            .capture
            .micro_batches
            .iter()
            .all(|m| m.num_items.is_some());
        let scale = self.token_scale();
        let per_step = self.diagnose(batches, |m, b| match m.num_items {
            Some(items) if b.sums.trained > 0 => items / scale / b.sums.trained as f64,
            _ => 1.0,
        });
        let per_micro = self.diagnose(batches, |_, _| 1.0);
        let conclude = |d: &Diagnosis| diagnosis::conclude(d, &ProbeResult::default(), &());
        let token = |c: &Conclusion| match c {
            Conclusion::Matched(h) => *h == Hypothesis::MaskedTokenMean,
            Conclusion::Ambiguous(hs) => hs.contains(&Hypothesis::MaskedTokenMean),
            _ => false,
        };
        let (step_c, micro_c) = (conclude(&per_step), conclude(&per_micro));
        let accumulation = self.accumulation();
        if by_step && has_items {
            if token(&step_c) {
                return (
                    Some(diagnosis::verdict_sentence(&step_c, &per_step)),
                    vec![],
                );
            }
            // Normalised per micro-batch, not by the step's count the trainer passed: the
            // trainer then does not divide by the accumulation either.
            if token(&micro_c) || matches!(micro_c, Conclusion::Matched(_)) {
                let (sentence, mut findings) = self.formula_findings(&micro_c, &per_micro);
                if accumulation > 1 {
                    findings.push(Finding::new(
                        Code::AccumulationMisweighted,
                        Severity::Error,
                        format!("the trainer's loss is normalised per micro-batch, yet the trainer passes num_items_in_batch and so does not divide by gradient_accumulation_steps ({accumulation}): each step's gradient is {accumulation}× too large, and its micro-batches weigh alike whatever their token counts"),
                    ));
                }
                return (sentence, findings);
            }
            return self.formula_findings(&step_c, &per_step);
        }
        if token(&micro_c) {
            let sentence = diagnosis::verdict_sentence(&micro_c, &per_micro);
            let findings = self
                .uneven_step(batches)
                .filter(|_| accumulation > 1)
                .map(|(rank, step, lo, hi)| {
                    Finding::new(
                        Code::AccumulationMisweighted,
                        Severity::Error,
                        format!("the trainer's loss is each micro-batch's own token mean, accumulated {accumulation} micro-batches a step with equal weight: a mean of micro-batch means, so in step {step} (rank {rank}), with micro-batches of {lo} and {hi} trained tokens, one token weighs up to {:.2}× another; normalise by the step's trained tokens (num_items_in_batch: a model that accepts loss kwargs, or compute_loss_func)", hi as f64 / lo.max(1) as f64),
                    )
                })
                .into_iter()
                .collect();
            return (Some(sentence), findings);
        }
        self.formula_findings(&micro_c, &per_micro)
    }

    /// The trainer's loss of each micro-batch, times `rescale`, against the next-token formulas.
    fn diagnose(
        &self,
        batches: &[TrainerBatch],
        rescale: impl Fn(&crate::data::capture::MicroBatch, &TrainerBatch) -> f64,
    ) -> Diagnosis {
        let mut d = Diagnosis::new(1e-4).with_subject("the trainer's loss");
        let none: (&[f32], &[u8]) = (&[], &[]);
        for (micro, b) in self.capture.micro_batches.iter().zip(batches) {
            let loss = micro.trainer_loss.unwrap_or(f64::NAN);
            let values = batch_hypotheses(&BatchLosses {
                rows: b.rows,
                next: b.sums,
                unshifted: none,
                double_shifted: none,
            });
            let errors = BatchLosses {
                rows: b.rows,
                next: b.errors,
                unshifted: none,
                double_shifted: none,
            };
            let tolerances = diagnosis::tolerances(&errors, &values, b.positions);
            d.observe(loss * rescale(micro, b), &values, &tolerances);
        }
        d
    }

    /// The findings of a conclusion other than the token mean: the formula's own, or a
    /// warning when none matches (a trainer may add an auxiliary term).
    fn formula_findings(&self, c: &Conclusion, d: &Diagnosis) -> (Option<String>, Vec<Finding>) {
        let sentence = diagnosis::verdict_sentence(c, d);
        let findings = match c {
            Conclusion::Matched(Hypothesis::MaskedTokenMean) | Conclusion::NoBatches => vec![],
            Conclusion::Ambiguous(hs) if hs.contains(&Hypothesis::MaskedTokenMean) => vec![],
            Conclusion::NoMatch { .. } => vec![Finding::new(
                Code::LossMismatch,
                Severity::Warning,
                format!("{sentence} (captured): an auxiliary term, label smoothing, or a normalisation of its own"),
            )],
            _ => diagnosis::findings(c, d, &ProbeResult::default(), &ProbeResult::default(), None),
        };
        (Some(sentence), findings)
    }

    /// Micro-batches per optimizer step (the most in any step).
    fn accumulation(&self) -> usize {
        let mut counts: BTreeMap<(i64, i64), usize> = BTreeMap::new();
        for m in &self.capture.micro_batches {
            *counts.entry((m.rank, m.step)).or_default() += 1;
        }
        counts.values().copied().max().unwrap_or(1)
    }

    /// The first step whose micro-batches hold different numbers of trained tokens: (rank,
    /// step, fewest, most).
    fn uneven_step(&self, batches: &[TrainerBatch]) -> Option<(i64, i64, u64, u64)> {
        let mut steps: BTreeMap<(i64, i64), (u64, u64)> = BTreeMap::new();
        for (m, b) in self.capture.micro_batches.iter().zip(batches) {
            let e = steps.entry((m.rank, m.step)).or_insert((u64::MAX, 0));
            e.0 = e.0.min(b.sums.trained);
            e.1 = e.1.max(b.sums.trained);
        }
        steps
            .into_iter()
            .find(|(_, (lo, hi))| lo != hi)
            .map(|((rank, step), (lo, hi))| (rank, step, lo, hi))
    }

    /// Each captured step's logged loss (where the trainer logged every step, on one rank)
    /// beside the step's token mean, from the run's own batches.
    pub(super) fn logged_steps(&self, batches: &[TrainerBatch]) -> Vec<LoggedStep> {
        if batches.len() != self.capture.micro_batches.len() || self.capture.world_size() > 1 {
            return vec![];
        }
        let mut steps: BTreeMap<i64, (f64, u64)> = BTreeMap::new();
        for (m, b) in self.capture.micro_batches.iter().zip(batches) {
            let e = steps.entry(m.step).or_default();
            e.0 += b.sums.masked_loss_sum;
            e.1 = e.1.saturating_add(b.sums.trained);
        }
        self.capture
            .logged_losses()
            .into_iter()
            .filter_map(|(step, logged)| {
                let &(sum, trained) = steps.get(&step)?;
                (trained > 0).then(|| LoggedStep {
                    step,
                    logged,
                    token_mean: sum / trained as f64,
                })
            })
            .collect()
    }

    /// `logged-loss-mismatch`: a step whose logged loss is not its token mean, beyond the
    /// 4 decimals transformers rounds it to and the drift of a fused loss kernel.
    pub(super) fn logged_findings(&self, logged: &[LoggedStep]) -> Vec<Finding> {
        let off: Vec<&LoggedStep> = logged
            .iter()
            .filter(|l| (l.logged - l.token_mean).abs() > 5e-5 + 2e-4 * l.token_mean.abs())
            .collect();
        let Some(first) = off.first() else {
            return vec![];
        };
        vec![Finding::new(
            Code::LoggedLossMismatch,
            Severity::Warning,
            format!(
                "the loss the trainer logged differs from the step's token mean in {} of {} captured steps; step {}: {:.4} logged, {:.4} the token mean ({:+.2}%): the number you watch is not the loss of the step",
                off.len(),
                logged.len(),
                first.step,
                first.logged,
                first.token_mean,
                (first.logged / first.token_mean - 1.0) * 100.0
            ),
        )]
    }

    /// `trainer-count-mismatch`: a step whose `num_items_in_batch` is not the trained targets
    /// of its micro-batches (the loss is then divided by the wrong count).
    pub(super) fn findings(&self) -> Vec<Finding> {
        if self.count_is_global() {
            return vec![];
        }
        let wrong: Vec<((i64, i64), u64, f64)> = self
            .steps()
            .into_iter()
            .filter_map(|(key, (trained, items))| {
                let items = items?;
                (items != trained as f64).then_some((key, trained, items))
            })
            .collect();
        let Some(&((rank, step), trained, items)) = wrong.first() else {
            return vec![];
        };
        vec![Finding::new(
            Code::TrainerCountMismatch,
            Severity::Error,
            format!(
                "in {} of {} captured steps the trainer's num_items_in_batch is not the trained targets of the step's micro-batches; first at step {step} (rank {rank}): {items} where the micro-batches hold {trained}, so the loss is divided by the wrong count",
                wrong.len(),
                self.steps().len()
            ),
        )]
    }
}
