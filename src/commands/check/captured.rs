//! A captured training run (`data::capture`) checked against what its trainer said: batched
//! micro-batch by micro-batch as the trainer did, each step's `num_items_in_batch` against
//! the trained targets of its micro-batches, and the trainer's loss turned back into a token
//! mean beside maskaudit's.

use std::collections::BTreeMap;

use crate::data::batch::Batch;
use crate::data::capture::{Capture, CaptureSummary};
use crate::findings::{Code, Finding, Severity};

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
    /// takes the loss kwargs, or a `compute_loss_func`), rather than by its own count.
    fn normalised_by_step(&self) -> bool {
        self.capture.setting("model_accepts_loss_kwargs")
            || self.capture.setting("compute_loss_func")
    }

    /// Whether `num_items_in_batch` counts every rank's targets (then one file cannot check it).
    fn count_is_global(&self) -> bool {
        self.capture.world_size() > 1 && self.capture.setting("average_tokens_across_devices")
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
        let scale = if self.capture.setting("average_tokens_across_devices") {
            self.capture.world_size().max(1) as f64
        } else {
            1.0
        };
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
        }
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
