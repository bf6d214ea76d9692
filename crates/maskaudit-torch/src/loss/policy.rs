//! Policy and preference losses on the torch side: per-token log-probs from the model, the
//! user's loss called on them with autograd, and the probes.
//!
//! The weight of a token is −∂loss/∂logprob. The probe pass gives advantages 1 and old and
//! reference log-probs equal to the current ones (every ratio 1, every KL term at its minimum),
//! so the weights are the aggregation alone; [`maskaudit_core::loss::policy_aggregation`] classifies
//! them. A preference loss's probe gives every log-prob 0 (every margin 0, so every pair gets
//! the same sigmoid factor) and reads how each sequence's log-probs are reduced.

use anyhow::{anyhow, Result};
use tch::{Device, Kind, Tensor};

use crate::loss::user::UserLoss;
use crate::model::{LanguageModel, LoadedModel};
use maskaudit_core::loss::policy_aggregation::{
    self as agg, Aggregation, BatchShape, DataPass, DataSequence, MicroTotals, PolicyProbe,
    PolicyReport, PolicyStep, RowWeight, TargetKind, WeightedBatch, REPORT_ROWS, TOLERANCE,
};
use maskaudit_core::loss::rollout_batch::{AdvantageValues, RolloutBatch};
use maskaudit_core::loss::user::LossArg;

/// What the loss's arguments make of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// `logprobs`, with rollout fields.
    Policy,
    /// `chosen_logprobs`/`rejected_logprobs`, with their masks.
    Preference,
}

const POLICY_ARGS: [LossArg; 7] = [
    LossArg::Logprobs,
    LossArg::OldLogprobs,
    LossArg::RefLogprobs,
    LossArg::Advantages,
    LossArg::ResponseMask,
    LossArg::LossMask,
    LossArg::NumItemsInBatch,
];

const PREFERENCE_ARGS: [LossArg; 6] = [
    LossArg::ChosenLogprobs,
    LossArg::RejectedLogprobs,
    LossArg::ChosenMask,
    LossArg::RejectedMask,
    LossArg::RefChosenLogprobs,
    LossArg::RefRejectedLogprobs,
];

/// None for a cross-entropy loss; an error for arguments of two kinds.
pub fn kind_of(args: &[LossArg]) -> std::result::Result<Option<LossKind>, String> {
    if !args.iter().any(|a| a.is_policy()) {
        return Ok(None);
    }
    let (kind, allowed): (LossKind, &[LossArg]) = if args.contains(&LossArg::Logprobs) {
        (LossKind::Policy, &POLICY_ARGS)
    } else if args.contains(&LossArg::ChosenLogprobs) || args.contains(&LossArg::RejectedLogprobs) {
        (LossKind::Preference, &PREFERENCE_ARGS)
    } else {
        return Err(
            "--loss-args: a policy loss takes logprobs, a preference loss chosen_logprobs and rejected_logprobs"
                .into(),
        );
    };
    match args.iter().find(|a| !allowed.contains(a)) {
        Some(a) => {
            let names: Vec<&str> = allowed.iter().map(|a| a.name()).collect();
            Err(format!(
                "--loss-args: {a} cannot be given to a {} loss (it takes {})",
                if kind == LossKind::Policy {
                    "policy"
                } else {
                    "preference"
                },
                names.join(", ")
            ))
        }
        None => Ok(Some(kind)),
    }
}

/// Per-token log-probs of each next token, `[B, T-1]` float32, without a graph to the model.
pub fn next_token_logprobs(model: &dyn LanguageModel, b: &RolloutBatch) -> Result<Tensor> {
    let (rows, width) = (b.rows as i64, b.width as i64);
    let device = model.device();
    let ids = Tensor::f_from_slice(&b.input_ids)?
        .f_view([rows, width])?
        .f_to_device(device)?;
    let attention = Tensor::f_from_slice(&b.attention_mask)?
        .f_view([rows, width])?
        .f_to_device(device)?;
    let logits = model.logits(&ids, &attention)?;
    let lp = logits
        .f_narrow(1, 0, width - 1)?
        .f_to_kind(Kind::Float)?
        .f_log_softmax(-1, Kind::Float)?;
    Ok(lp
        .f_gather(2, &ids.f_narrow(1, 1, width - 1)?.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?)
}

fn upload(values: &[f64], shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::f_from_slice(values)?
        .f_to_kind(Kind::Float)?
        .f_view(shape)?
        .f_to_device(device)?)
}

fn upload_bool(values: &[bool], shape: &[i64], device: Device) -> Result<Tensor> {
    let bytes: Vec<u8> = values.iter().map(|&v| u8::from(v)).collect();
    Ok(Tensor::f_from_slice(&bytes)?
        .f_view(shape)?
        .f_to_device(device)?
        .f_ne(0)?)
}

/// A detached copy.
fn fresh(t: &Tensor) -> Result<Tensor> {
    let mut out = t.f_detach()?.f_empty_like()?;
    out.f_copy_(&t.f_detach()?)?;
    Ok(out)
}

fn host(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(
        t.f_to_kind(Kind::Double)?
            .f_to_device(Device::Cpu)?
            .f_flatten(0, -1)?,
    )?)
}

/// The loss's value and −∂loss/∂leaf for each leaf (zeros where the loss does not use it).
struct Called {
    value: f64,
    grads: Vec<Vec<f64>>,
}

/// Calls the loss with `inputs` (copied: a loss that writes into them cannot move ours) and
/// differentiates it with respect to the `leaves`.
fn call(
    loss: &UserLoss,
    model: &dyn LoadedModel,
    inputs: &[(LossArg, Tensor)],
    leaves: &[LossArg],
) -> Result<Called> {
    let find = |a: LossArg| -> Result<&Tensor> {
        inputs
            .iter()
            .find(|(k, _)| *k == a)
            .map(|(_, t)| t)
            .ok_or_else(|| anyhow!("--loss-args: {a} is not available to this loss"))
    };
    tch::with_grad(|| {
        let leaf_tensors: Vec<Tensor> = leaves
            .iter()
            .map(|&a| -> Result<Tensor> { Ok(fresh(find(a)?)?.f_set_requires_grad(true)?) })
            .collect::<Result<_>>()?;
        let values: Vec<Tensor> = loss
            .args()
            .iter()
            .map(|&a| -> Result<Tensor> {
                match leaves.iter().position(|&l| l == a) {
                    Some(i) => Ok(leaf_tensors[i].shallow_clone()),
                    None => fresh(find(a)?),
                }
            })
            .collect::<Result<_>>()?;
        let (value, tensor) = loss.call_tensors(model, &values)?;
        let mut grads = vec![];
        for leaf in &leaf_tensors {
            let zeros = || vec![0.0; leaf.numel()];
            let grad = match &tensor {
                Some(t) if t.requires_grad() => {
                    let total = t.f_sum(t.kind())?;
                    match Tensor::f_run_backward(&[&total], &[leaf], true, false) {
                        Ok(mut g) => match g.pop() {
                            Some(g) if g.defined() => host(&g.f_neg()?)?,
                            _ => zeros(),
                        },
                        Err(e) if e.to_string().contains("not have been used") => zeros(),
                        Err(e) => return Err(e.into()),
                    }
                }
                _ => zeros(),
            };
            grads.push(grad);
        }
        Ok(Called { value, grads })
    })
}

/// The same tensor with `extra` columns of `fill` appended.
fn widen(t: &Tensor, extra: i64, fill: f64) -> Result<Tensor> {
    let size = t.size();
    let pad = Tensor::f_full([size[0], extra], fill, (t.kind(), t.device()))?;
    Ok(Tensor::f_cat(&[t, &pad], 1)?)
}

/// The audit of a policy or preference loss over a run.
pub struct PolicyAudit {
    loss: UserLoss,
    kind: LossKind,
    probes: bool,
    expected: Option<Aggregation>,
    shapes: Vec<BatchShape>,
    data_shapes: Vec<BatchShape>,
    data_values: Vec<f64>,
    data_rows: Vec<DataSequence>,
    data_non_finite: Option<usize>,
    nan_probe: PolicyProbe,
    padding_probe: PolicyProbe,
    steps: Vec<PolicyStep>,
}

/// Batches the NaN and padding probes run on.
const PROBE_BATCHES: usize = 4;

impl PolicyAudit {
    pub fn new(
        loss: UserLoss,
        kind: LossKind,
        probes: bool,
        expected: Option<Aggregation>,
    ) -> Self {
        let skipped = |why: &str| PolicyProbe::skipped(why);
        Self {
            loss,
            kind,
            probes,
            expected,
            shapes: vec![],
            data_shapes: vec![],
            data_values: vec![],
            data_rows: vec![],
            data_non_finite: None,
            nan_probe: if probes {
                PolicyProbe::default()
            } else {
                skipped("--no-probes")
            },
            padding_probe: if probes {
                PolicyProbe::default()
            } else {
                skipped("--no-probes")
            },
            steps: vec![],
        }
    }

    pub fn kind(&self) -> LossKind {
        self.kind
    }

    pub fn takes_count(&self) -> bool {
        self.loss.args().contains(&LossArg::NumItemsInBatch)
    }

    fn probing(&self) -> bool {
        self.probes && self.shapes.len() <= PROBE_BATCHES
    }

    /// The probe inputs of a policy batch: advantages 1 (in the data's shape), old and
    /// reference log-probs equal to the current ones.
    fn policy_inputs(
        &self,
        b: &RolloutBatch,
        lp: &Tensor,
        num_items: i64,
    ) -> Result<Vec<(LossArg, Tensor)>> {
        let (rows, t) = (b.rows as i64, b.targets() as i64);
        let device = lp.device();
        let mask = upload(
            &b.mask.iter().map(|&m| f64::from(m)).collect::<Vec<_>>(),
            &[rows, t],
            device,
        )?;
        let adv = match &b.advantages {
            AdvantageValues::Row(_) => Tensor::f_ones([rows, 1], (Kind::Float, device))?,
            AdvantageValues::Token(_) => lp.f_ones_like()?,
        };
        Ok(vec![
            (LossArg::Logprobs, lp.shallow_clone()),
            (LossArg::OldLogprobs, fresh(lp)?),
            (LossArg::RefLogprobs, fresh(lp)?),
            (LossArg::Advantages, adv),
            (LossArg::ResponseMask, mask.shallow_clone()),
            (LossArg::LossMask, mask),
            (
                LossArg::NumItemsInBatch,
                Tensor::from(num_items).f_to_device(device)?,
            ),
        ])
    }

    fn replace(inputs: &mut [(LossArg, Tensor)], arg: LossArg, t: Tensor) {
        if let Some(slot) = inputs.iter_mut().find(|(a, _)| *a == arg) {
            slot.1 = t;
        }
    }

    fn get(inputs: &[(LossArg, Tensor)], arg: LossArg) -> Tensor {
        inputs
            .iter()
            .find(|(a, _)| *a == arg)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(Tensor::new)
    }

    /// One policy batch: the probe, its classification evidence, the probes, and the data's
    /// own pass. Returns the probe's total weight (for the step check).
    pub fn observe_policy(&mut self, model: &dyn LoadedModel, b: &RolloutBatch) -> Result<f64> {
        let lp = next_token_logprobs(model, b)?;
        let own = b.trained() as i64;
        let inputs = self.policy_inputs(b, &lp, own)?;
        let probe = call(&self.loss, model, &inputs, &[LossArg::Logprobs])?;
        if !probe.value.is_finite() {
            anyhow::bail!(
                "{}: the loss returned {} on the probe (advantages 1, old log-probs = current), on the batch from line {}",
                self.loss.source_name(),
                probe.value,
                b.lines[0]
            );
        }
        let weights = &probe.grads[0];
        let total: f64 = weights.iter().sum();
        self.shapes.push(agg::analyse(&WeightedBatch {
            lines: b.lines.clone(),
            targets: b.targets(),
            weights: weights.clone(),
            kinds: b.kinds.clone(),
            num_items: own as f64,
        }));
        if self.probing() {
            self.nan_policy(model, b, &inputs)?;
            self.padding_policy(model, b, &inputs, weights)?;
        }
        self.data_pass(model, b, &lp, inputs)?;
        Ok(total)
    }

    /// The probe's total weight of a batch called with `num_items` as the step's count.
    pub fn total_with_count(
        &self,
        model: &dyn LoadedModel,
        b: &RolloutBatch,
        num_items: i64,
    ) -> Result<f64> {
        let lp = next_token_logprobs(model, b)?;
        let inputs = self.policy_inputs(b, &lp, num_items)?;
        let called = call(&self.loss, model, &inputs, &[LossArg::Logprobs])?;
        Ok(called.grads[0].iter().sum())
    }

    pub fn push_step(&mut self, index: usize, micro: &[MicroTotals], per_step: usize) {
        let takes = self.takes_count();
        self.steps.push(agg::step(index, micro, per_step, takes));
    }

    fn nan_policy(
        &mut self,
        model: &dyn LoadedModel,
        b: &RolloutBatch,
        inputs: &[(LossArg, Tensor)],
    ) -> Result<()> {
        let (rows, t) = (b.rows as i64, b.targets() as i64);
        let masked: Vec<bool> = b.kinds.iter().map(|&k| k != TargetKind::Trained).collect();
        let masked = upload_bool(&masked, &[rows, t], inputs[0].1.device())?;
        let mut nan = inputs
            .iter()
            .map(|(a, x)| (*a, x.shallow_clone()))
            .collect::<Vec<_>>();
        let mut poison = |arg: LossArg| -> Result<()> {
            let x = Self::get(&nan, arg);
            if x.dim() == 2 && x.size()[1] == t {
                let y = x.f_masked_fill(&masked, f64::NAN)?;
                Self::replace(&mut nan, arg, y);
            }
            Ok(())
        };
        for arg in [
            LossArg::Logprobs,
            LossArg::OldLogprobs,
            LossArg::RefLogprobs,
            LossArg::Advantages,
        ] {
            poison(arg)?;
        }
        let called = call(&self.loss, model, &nan, &[LossArg::Logprobs])?;
        let finite = called.value.is_finite()
            && called.grads[0]
                .iter()
                .zip(&b.kinds)
                .all(|(w, &k)| k != TargetKind::Trained || w.is_finite());
        self.nan_probe.record(finite, b.lines[0]);
        self.nan_probe.note = "NaN put at masked positions of logprobs, old_logprobs, ref_logprobs and per-token advantages".into();
        Ok(())
    }

    fn padding_policy(
        &mut self,
        model: &dyn LoadedModel,
        b: &RolloutBatch,
        inputs: &[(LossArg, Tensor)],
        weights: &[f64],
    ) -> Result<()> {
        let t = b.targets() as i64;
        let extra = (t / 2).max(8);
        let mut wide = vec![];
        for (arg, x) in inputs {
            let y = match arg {
                LossArg::Logprobs | LossArg::OldLogprobs | LossArg::RefLogprobs => {
                    widen(x, extra, -1.0)?
                }
                LossArg::ResponseMask | LossArg::LossMask => widen(x, extra, 0.0)?,
                LossArg::Advantages if x.size()[1] == t => widen(x, extra, 1.0)?,
                _ => x.shallow_clone(),
            };
            wide.push((*arg, y));
        }
        let called = call(&self.loss, model, &wide, &[LossArg::Logprobs])?;
        let w = (t + extra) as usize;
        let biggest = weights.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let moved = (0..b.rows).any(|r| {
            (0..b.targets()).any(|p| {
                let before = weights[r * b.targets() + p];
                let after = called.grads[0][r * w + p];
                (after - before).abs() > TOLERANCE * biggest
            })
        });
        self.padding_probe
            .record(called.value.is_finite() && !moved, b.lines[0]);
        self.padding_probe.note = format!(
            "appended {extra} padding columns (mask 0) and compared every real token's weight"
        );
        Ok(())
    }

    /// The data's own advantages, old and reference log-probs (the current ones where a row
    /// gives none).
    fn data_pass(
        &mut self,
        model: &dyn LoadedModel,
        b: &RolloutBatch,
        lp: &Tensor,
        mut inputs: Vec<(LossArg, Tensor)>,
    ) -> Result<()> {
        let (rows, t) = (b.rows as i64, b.targets() as i64);
        let device = lp.device();
        let given = |values: &[f64], given: &[bool]| -> Result<Tensor> {
            let data = upload(values, &[rows, t], device)?;
            let mask = upload_bool(given, &[rows, t], device)?;
            Ok(data.f_where_self(&mask, &lp.f_detach()?)?)
        };
        Self::replace(
            &mut inputs,
            LossArg::OldLogprobs,
            given(&b.old_logprobs, &b.old_given)?,
        );
        Self::replace(
            &mut inputs,
            LossArg::RefLogprobs,
            given(&b.ref_logprobs, &b.ref_given)?,
        );
        let adv = match &b.advantages {
            AdvantageValues::Row(a) => upload(a, &[rows, 1], device)?,
            AdvantageValues::Token(a) => upload(a, &[rows, t], device)?,
        };
        Self::replace(&mut inputs, LossArg::Advantages, adv);
        let called = call(&self.loss, model, &inputs, &[LossArg::Logprobs])?;
        if !called.value.is_finite() {
            self.data_non_finite.get_or_insert(b.lines[0]);
            return Ok(());
        }
        self.data_values.push(called.value);
        let weights = called.grads[0].clone();
        let shape = agg::analyse(&WeightedBatch {
            lines: b.lines.clone(),
            targets: b.targets(),
            weights: weights.iter().map(|w| w.abs()).collect(),
            kinds: b.kinds.clone(),
            num_items: b.trained() as f64,
        });
        self.data_shapes.push(shape);
        let tt = b.targets();
        for (r, &line) in b.lines.iter().enumerate() {
            if self.data_rows.len() >= REPORT_ROWS {
                break;
            }
            let span = r * tt..(r + 1) * tt;
            let trained: Vec<usize> = span
                .clone()
                .filter(|&i| b.kinds[i] == TargetKind::Trained)
                .collect();
            if trained.is_empty() {
                continue;
            }
            let advantage = match &b.advantages {
                AdvantageValues::Row(a) => a[r],
                AdvantageValues::Token(a) => {
                    trained.iter().map(|&i| a[i]).sum::<f64>() / trained.len() as f64
                }
            };
            self.data_rows.push(DataSequence {
                line,
                length: trained.len(),
                advantage,
                sequence_weight: trained.iter().map(|&i| weights[i]).sum(),
            });
        }
        Ok(())
    }

    /// One preference batch: chosen and rejected rows of the same pairs, padded to one width.
    pub fn observe_preference(
        &mut self,
        model: &dyn LoadedModel,
        chosen: &RolloutBatch,
        rejected: &RolloutBatch,
    ) -> Result<()> {
        let (rows, t) = (chosen.rows as i64, chosen.targets() as i64);
        let device = model.device();
        let mask = |b: &RolloutBatch| {
            upload(
                &b.mask.iter().map(|&m| f64::from(m)).collect::<Vec<_>>(),
                &[rows, t],
                device,
            )
        };
        let zeros = || Tensor::f_zeros([rows, t], (Kind::Float, device));
        let inputs = vec![
            (LossArg::ChosenLogprobs, zeros()?),
            (LossArg::RejectedLogprobs, zeros()?),
            (LossArg::RefChosenLogprobs, zeros()?),
            (LossArg::RefRejectedLogprobs, zeros()?),
            (LossArg::ChosenMask, mask(chosen)?),
            (LossArg::RejectedMask, mask(rejected)?),
        ];
        let leaves = [LossArg::ChosenLogprobs, LossArg::RejectedLogprobs];
        let probe = call(&self.loss, model, &inputs, &leaves)?;
        if !probe.value.is_finite() {
            anyhow::bail!(
                "{}: the loss returned {} on the probe (every log-prob 0), on the pairs from line {}",
                self.loss.source_name(),
                probe.value,
                chosen.lines[0]
            );
        }
        let both = self.pair_weights(chosen, rejected, &probe);
        self.shapes.push(agg::analyse(&both));
        if self.probing() {
            self.nan_preference(model, chosen, rejected, &inputs, &leaves)?;
            let extra = (t / 2).max(8);
            let wide: Vec<(LossArg, Tensor)> = inputs
                .iter()
                .map(|(a, x)| Ok((*a, widen(x, extra, 0.0)?)))
                .collect::<Result<_>>()?;
            let called = call(&self.loss, model, &wide, &leaves)?;
            let w = (t + extra) as usize;
            let biggest = both.weights.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let moved = (0..2).any(|side| {
                (0..chosen.rows).any(|r| {
                    (0..chosen.targets()).any(|p| {
                        let before = probe.grads[side][r * chosen.targets() + p];
                        let after = called.grads[side][r * w + p];
                        (after - before).abs() > TOLERANCE * biggest
                    })
                })
            });
            self.padding_probe
                .record(called.value.is_finite() && !moved, chosen.lines[0]);
            self.padding_probe.note = format!(
                "appended {extra} padding columns (mask 0) and compared every real token's weight"
            );
        }
        Ok(())
    }

    /// Chosen rows' weights (−∂/∂chosen) then rejected rows' (+∂/∂rejected): both positive for
    /// a loss that prefers the chosen.
    fn pair_weights(
        &self,
        chosen: &RolloutBatch,
        rejected: &RolloutBatch,
        c: &Called,
    ) -> WeightedBatch {
        let mut lines = chosen.lines.clone();
        lines.extend(&rejected.lines);
        let mut weights = c.grads[0].clone();
        weights.extend(c.grads[1].iter().map(|w| -w));
        let mut kinds = chosen.kinds.clone();
        kinds.extend(&rejected.kinds);
        WeightedBatch {
            lines,
            targets: chosen.targets(),
            weights,
            kinds,
            num_items: (chosen.trained() + rejected.trained()) as f64,
        }
    }

    fn nan_preference(
        &mut self,
        model: &dyn LoadedModel,
        chosen: &RolloutBatch,
        rejected: &RolloutBatch,
        inputs: &[(LossArg, Tensor)],
        leaves: &[LossArg],
    ) -> Result<()> {
        let (rows, t) = (chosen.rows as i64, chosen.targets() as i64);
        let device = model.device();
        let masked = |b: &RolloutBatch| {
            let m: Vec<bool> = b.kinds.iter().map(|&k| k != TargetKind::Trained).collect();
            upload_bool(&m, &[rows, t], device)
        };
        let (mc, mr) = (masked(chosen)?, masked(rejected)?);
        let nan: Vec<(LossArg, Tensor)> = inputs
            .iter()
            .map(|(a, x)| {
                let y = match a {
                    LossArg::ChosenLogprobs | LossArg::RefChosenLogprobs => {
                        x.f_masked_fill(&mc, f64::NAN)?
                    }
                    LossArg::RejectedLogprobs | LossArg::RefRejectedLogprobs => {
                        x.f_masked_fill(&mr, f64::NAN)?
                    }
                    _ => x.shallow_clone(),
                };
                Ok((*a, y))
            })
            .collect::<Result<_>>()?;
        let called = call(&self.loss, model, &nan, leaves)?;
        let kinds = [&chosen.kinds, &rejected.kinds];
        let finite = called.value.is_finite()
            && (0..2).all(|s| {
                called.grads[s]
                    .iter()
                    .zip(kinds[s])
                    .all(|(w, &k)| k != TargetKind::Trained || w.is_finite())
            });
        self.nan_probe.record(finite, chosen.lines[0]);
        self.nan_probe.note =
            "NaN put at masked positions of the chosen and rejected (and reference) log-probs"
                .into();
        Ok(())
    }

    /// The report and the findings.
    pub fn finish(self) -> (PolicyReport, Vec<maskaudit_core::findings::Finding>) {
        let classification = agg::classify(&self.shapes);
        let (preference_logps, note) = match self.kind {
            LossKind::Preference => agg::preference_logps(&self.shapes),
            LossKind::Policy => (None, String::new()),
        };
        let sequences: Vec<RowWeight> = self
            .shapes
            .iter()
            .flat_map(|s| s.rows.iter().cloned())
            .take(REPORT_ROWS)
            .collect();
        let fold = |f: fn(&BatchShape) -> f64| self.shapes.iter().map(f).fold(0.0, f64::max);
        let mut report = PolicyReport {
            kind: match self.kind {
                LossKind::Policy => "policy",
                LossKind::Preference => "preference",
            },
            expected_aggregation: self.expected,
            preference_logps,
            max_masked_share: fold(|s| s.masked_share),
            max_padding_share: fold(|s| s.padding_share),
            nan_probe: self.nan_probe,
            padding_probe: self.padding_probe,
            data_pass: (self.kind == LossKind::Policy).then(|| DataPass {
                value: (!self.data_values.is_empty())
                    .then(|| self.data_values.iter().sum::<f64>() / self.data_values.len() as f64),
                sequence_weight_exponent: agg::exponent(&self.data_shapes),
                sequences: self.data_rows,
                non_finite_line: self.data_non_finite,
            }),
            sequences,
            steps: self.steps,
            batches: self.shapes.len() as u64,
            classification,
        };
        if self.kind == LossKind::Preference {
            // A preference loss has no policy aggregation; its statistic is preference_logps.
            report.classification.aggregation = None;
            report.classification.candidates.clear();
            report.classification.constant = None;
            report.classification.constants.clear();
            report.classification.scale = None;
            report.classification.note = note;
            if report.padding_probe.passed == Some(false) {
                // Uniform weights that move with the padded width: a mean over it.
                report.preference_logps = None;
                report.classification.note =
                    "the log-probs are averaged over the padded length".into();
            }
        }
        let findings = agg::findings(&report);
        (report, findings)
    }
}
