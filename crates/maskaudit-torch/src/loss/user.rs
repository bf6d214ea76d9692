//! Running the user's own loss on the same batches as `check`, and the invariance probes.
//!
//! The loss is a TorchScript module (`--loss`) or a method of the model (`--loss-method`),
//! called with tensors chosen by name (`--loss-args`). Its scalar is compared batch by batch
//! with the formulas in [`crate::loss::diagnosis`]; the probes then change what a correct loss must
//! ignore (extra padding, logits at untrained positions) and watch whether the value moves.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use tch::{CModule, Device, IValue, Kind, Tensor};

use crate::data::batch::Batch;
use crate::findings::Finding;
use crate::loss::aggregate::BatchSums;
use crate::loss::batch::BatchTensors;
use crate::loss::diagnosis::{
    self, batch_hypotheses, BatchLosses, Conclusion, Diagnosis, Hypothesis, ProbeResult,
};
use crate::model::{self, describe, torch_message, LoadedModel, ModelError};
use maskaudit_core::loss::user::{
    gradient_findings, padding_note, LossArg, Probes, UserLossReport,
};
use maskaudit_core::loss::weights::{self, BatchGradient, GradientSummary};

/// Batches the probes run on: the first ones with a trained target. Enough to catch a loss
/// that moves, cheap on a large dataset.
pub const PROBE_BATCHES: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum UserLossError {
    #[error("{source_name}: the loss failed: {message} (called with {args})")]
    Threw {
        source_name: String,
        message: String,
        args: String,
    },
    #[error("{source_name}: the loss returned {found}; expected a scalar tensor (or a tuple/list/dict whose first element or \"loss\" entry is one)")]
    NotScalar { source_name: String, found: String },
    #[error(
        "{source_name}: the loss returned {value}, not a finite real number (called with {args})"
    )]
    NotFinite {
        source_name: String,
        value: String,
        args: String,
    },
}

enum Source {
    Module { module: CModule, path: String },
    Method { name: String, model_path: String },
}

/// The user's loss and the arguments it takes.
pub struct UserLoss {
    source: Source,
    args: Vec<LossArg>,
}

impl UserLoss {
    pub fn from_file(path: &Path, device: Device, args: Vec<LossArg>) -> Result<Self, ModelError> {
        Ok(Self {
            source: Source::Module {
                module: model::load_module(path, device)?,
                path: path.display().to_string(),
            },
            args,
        })
    }

    /// A method of the model; logits-derived arguments are dropped (the method makes its own).
    pub fn method(name: &str, model_path: &Path, args: Vec<LossArg>) -> Self {
        Self {
            source: Source::Method {
                name: name.to_string(),
                model_path: model::path_string(model_path),
            },
            args: args.into_iter().filter(|a| !a.from_logits()).collect(),
        }
    }

    pub fn source_name(&self) -> String {
        match &self.source {
            Source::Module { path, .. } => path.clone(),
            Source::Method { name, model_path } => format!("{model_path}::{name}"),
        }
    }

    pub fn args(&self) -> &[LossArg] {
        &self.args
    }

    pub fn takes_logits(&self) -> bool {
        self.args.iter().any(|a| a.from_logits())
    }

    /// Calls the loss and returns its scalar. The loss gets copies: one that writes into its
    /// inputs (zeroing the logits, say) cannot change what maskaudit computes from them.
    pub fn call(&self, model: &dyn LoadedModel, t: &LossTensors) -> Result<f64, UserLossError> {
        let values = self.copies(t)?;
        let out = self.invoke(model, &values)?;
        Ok(self.finite(&values, scalar(out))?.0)
    }

    /// [`UserLoss::call`], and the gradient of the loss with respect to the logits `[B,T,V]`
    /// (None when the loss takes no logits or its value does not depend on them).
    pub fn call_with_gradient(
        &self,
        model: &dyn LoadedModel,
        t: &LossTensors,
    ) -> Result<(f64, Option<Tensor>), UserLossError> {
        let torch = |e: tch::TchError| UserLossError::Threw {
            source_name: self.source_name(),
            message: torch_message(&e.to_string()),
            args: String::new(),
        };
        // The leaf is a private copy: a loss that writes into its logits under no_grad (allowed
        // on a leaf) must not move what maskaudit's probes compute from them afterwards.
        let leaf = model::fresh_copy(&t.logits)
            .and_then(|l| l.f_set_requires_grad(true))
            .map_err(torch)?;
        let attempt = tch::with_grad(|| {
            // The leaf itself: PyTorch refuses in-place writes to it and its views under grad.
            let inputs = LossTensors {
                logits: leaf.shallow_clone(),
                ..t.copied().map_err(torch)?
            };
            let values: Vec<Tensor> = self.args.iter().map(|&a| inputs.get(a)).collect();
            let out = self.invoke(model, &values)?;
            let (value, tensor) = self.finite(&values, scalar(out))?;
            let grad = match tensor {
                Some(loss) if loss.requires_grad() => {
                    let loss = loss.f_sum(loss.kind()).map_err(torch)?;
                    Tensor::f_run_backward(&[&loss], &[&leaf], false, false)
                        .map_err(torch)?
                        .pop()
                }
                _ => None,
            };
            Ok((value, grad))
        });
        match attempt {
            Ok(done) => Ok(done),
            // A loss that writes into its logits under autograd fails on the leaf, for that
            // reason alone: run it on copies, without a weight map. Any other failure is the
            // loss's own, and fails the run (a retry that happened to pass would hide it).
            Err(UserLossError::Threw { message, .. }) if writes_into_leaf(&message) => {
                Ok((self.call(model, t)?, None))
            }
            Err(e) => Err(e),
        }
    }

    /// Calls the loss on tensors given in the order of its arguments; the value may be
    /// non-finite (the policy probes judge that), the tensor is the loss's scalar when it is
    /// one (for autograd).
    pub fn call_tensors(
        &self,
        model: &dyn LoadedModel,
        values: &[Tensor],
    ) -> Result<(f64, Option<Tensor>), UserLossError> {
        let out = self.invoke(model, values)?;
        match scalar(out) {
            Ok((Scalar::Real(x), tensor)) => Ok((x, tensor)),
            Ok((Scalar::Complex, _)) => Err(UserLossError::NotFinite {
                source_name: self.source_name(),
                value: "a complex tensor".into(),
                args: self.described(values),
            }),
            Err(found) => Err(UserLossError::NotScalar {
                source_name: self.source_name(),
                found,
            }),
        }
    }

    fn copies(&self, t: &LossTensors) -> Result<Vec<Tensor>, UserLossError> {
        self.args
            .iter()
            .map(|&a| model::fresh_copy(&t.get(a)))
            .collect::<Result<_, _>>()
            .map_err(|e| UserLossError::Threw {
                source_name: self.source_name(),
                message: torch_message(&e.to_string()),
                args: String::new(),
            })
    }

    fn described(&self, values: &[Tensor]) -> String {
        self.args
            .iter()
            .zip(values)
            .map(|(a, v)| format!("{a} {:?} {:?}", v.size(), v.kind()))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn invoke(&self, model: &dyn LoadedModel, values: &[Tensor]) -> Result<IValue, UserLossError> {
        let inputs: Vec<IValue> = values
            .iter()
            .map(|v| IValue::Tensor(v.shallow_clone()))
            .collect();
        match &self.source {
            Source::Module { module, .. } => module.forward_is(&inputs),
            Source::Method { name, .. } => match model.torchscript() {
                Some(module) => module.method_is(name, &inputs),
                None => Err(tch::TchError::Torch(format!(
                    "--loss-method {name}: the model is not TorchScript, so it has no methods to call"
                ))),
            },
        }
        .map_err(|e| UserLossError::Threw {
            source_name: self.source_name(),
            message: torch_message(&e.to_string()),
            args: self.described(values),
        })
    }

    /// The loss's value, which must be a finite real number, and its tensor when it is one.
    fn finite(
        &self,
        values: &[Tensor],
        out: Result<(Scalar, Option<Tensor>), String>,
    ) -> Result<(f64, Option<Tensor>), UserLossError> {
        match out {
            Ok((Scalar::Real(x), tensor)) if x.is_finite() => Ok((x, tensor)),
            Ok((Scalar::Real(x), _)) => Err(UserLossError::NotFinite {
                source_name: self.source_name(),
                value: x.to_string(),
                args: self.described(values),
            }),
            Ok((Scalar::Complex, _)) => Err(UserLossError::NotFinite {
                source_name: self.source_name(),
                value: "a complex tensor".into(),
                args: self.described(values),
            }),
            Err(found) => Err(UserLossError::NotScalar {
                source_name: self.source_name(),
                found,
            }),
        }
    }
}

/// Whether autograd refused the loss an in-place write into the logits it differentiates.
fn writes_into_leaf(message: &str) -> bool {
    message.contains("leaf Variable that requires grad")
}

/// What a loss's scalar turned out to be.
enum Scalar {
    Real(f64),
    Complex,
}

/// The scalar in a loss's output, or what came back instead.
fn scalar(out: IValue) -> Result<(Scalar, Option<Tensor>), String> {
    let tensor = match out {
        IValue::Tensor(t) => t,
        IValue::Double(x) => return Ok((Scalar::Real(x), None)),
        IValue::Tuple(items) | IValue::GenericList(items) => match items.into_iter().next() {
            Some(IValue::Tensor(t)) => t,
            Some(IValue::Double(x)) => return Ok((Scalar::Real(x), None)),
            Some(other) => {
                return Err(format!(
                    "a tuple whose first element is {}",
                    describe(&other)
                ))
            }
            None => return Err("an empty tuple".into()),
        },
        IValue::GenericDict(entries) => {
            let found = entries.into_iter().find_map(|(k, v)| match (k, v) {
                (IValue::String(k), IValue::Tensor(t)) if k == "loss" => Some(t),
                _ => None,
            });
            match found {
                Some(t) => t,
                None => return Err("a dict without a \"loss\" tensor".into()),
            }
        }
        other => return Err(describe(&other)),
    };
    if tensor.numel() != 1 {
        return Err(format!(
            "a {:?} tensor of shape {:?}",
            tensor.kind(),
            tensor.size()
        ));
    }
    if matches!(
        tensor.kind(),
        Kind::ComplexHalf | Kind::ComplexFloat | Kind::ComplexDouble
    ) {
        return Ok((Scalar::Complex, None));
    }
    let value = tensor
        .f_detach()
        .and_then(|t| t.f_to_kind(Kind::Double))
        .and_then(|t| t.f_view([1]))
        .and_then(|t| t.f_double_value(&[0]))
        .map_err(|e| torch_message(&e.to_string()))?;
    Ok((Scalar::Real(value), Some(tensor)))
}

/// The named tensors of one batch, on the model's device.
pub struct LossTensors {
    logits: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    /// int64 0/1 `[B, T]`, aligned with input_ids.
    mask: Tensor,
    /// Trained targets of the optimizer step this batch belongs to.
    num_items: i64,
}

impl LossTensors {
    pub fn new(
        logits: &Tensor,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        mask: &Tensor,
        num_items: i64,
    ) -> Self {
        Self {
            logits: logits.shallow_clone(),
            input_ids: input_ids.shallow_clone(),
            attention_mask: attention_mask.shallow_clone(),
            mask: mask.shallow_clone(),
            num_items,
        }
    }

    /// Fresh copies of the batch's integer tensors, the logits shared.
    fn copied(&self) -> Result<Self, tch::TchError> {
        Ok(Self {
            logits: self.logits.shallow_clone(),
            input_ids: model::fresh_copy(&self.input_ids)?,
            attention_mask: model::fresh_copy(&self.attention_mask)?,
            mask: model::fresh_copy(&self.mask)?,
            num_items: self.num_items,
        })
    }

    fn positions(&self) -> i64 {
        self.input_ids.size()[1]
    }

    fn get(&self, arg: LossArg) -> Tensor {
        let t = self.positions();
        match arg {
            LossArg::Logits => self.logits.shallow_clone(),
            LossArg::InputIds => self.input_ids.shallow_clone(),
            LossArg::Labels => self.input_ids.masked_fill(&self.mask.eq(0), -100),
            LossArg::AttentionMask => self.attention_mask.shallow_clone(),
            LossArg::ShiftLogits => self.logits.narrow(1, 0, t - 1),
            LossArg::Targets => self.input_ids.narrow(1, 1, t - 1),
            LossArg::LossMask => self.mask.narrow(1, 1, t - 1).to_kind(Kind::Float),
            LossArg::NumItemsInBatch => {
                Tensor::from(self.num_items).to_device(self.input_ids.device())
            }
            // Never asked for here: a loss taking them runs on the policy path.
            _ => Tensor::new(),
        }
    }

    /// The same batch with `extra` padding columns: pad ids, attention 0, mask 0, and random
    /// logits there (a correct loss never looks at them).
    fn with_padding(&self, extra: i64, pad_id: i64) -> Result<Self, tch::TchError> {
        let size = self.input_ids.size();
        let (b, device) = (size[0], self.input_ids.device());
        let zeros = Tensor::f_zeros([b, extra], (Kind::Int64, device))?;
        let v = self.logits.size()[2];
        let noise = Tensor::f_randn([b, extra, v], (self.logits.kind(), device))?;
        Ok(Self {
            logits: Tensor::f_cat(&[&self.logits, &noise], 1)?,
            input_ids: Tensor::f_cat(&[&self.input_ids, &zeros.f_fill(pad_id)?], 1)?,
            attention_mask: Tensor::f_cat(&[&self.attention_mask, &zeros], 1)?,
            mask: Tensor::f_cat(&[&self.mask, &zeros], 1)?,
            num_items: self.num_items,
        })
    }

    /// The same batch with random logits wherever the logits predict no trained target
    /// (position t predicts t+1; the last position predicts nothing).
    fn with_untrained_logits_randomised(&self) -> Result<Self, tch::TchError> {
        let size = self.input_ids.size();
        let (b, t, device) = (size[0], size[1], self.input_ids.device());
        let used = Tensor::f_cat(
            &[
                &self.mask.f_narrow(1, 1, t - 1)?,
                &Tensor::f_zeros([b, 1], (Kind::Int64, device))?,
            ],
            1,
        )?
        .f_ne(0)?
        .f_unsqueeze(-1)?;
        let noise = self.logits.f_randn_like()?.f_mul_scalar(4.0)?;
        Ok(Self {
            logits: self.logits.f_where_self(&used, &noise)?,
            input_ids: self.input_ids.shallow_clone(),
            attention_mask: self.attention_mask.shallow_clone(),
            mask: self.mask.shallow_clone(),
            num_items: self.num_items,
        })
    }
}

/// The audit of the user's loss over a whole run.
pub struct LossAudit {
    loss: UserLoss,
    diagnosis: Diagnosis,
    padding: ProbeResult,
    masked_logits: ProbeResult,
    probes: bool,
    probed: usize,
    pad_id: i64,
    gradients: Vec<BatchGradient>,
    /// Per weighed batch, the scale at which a formula's own weights appear in the gradient.
    gradient_scales: Vec<f64>,
    weights_out: Option<WeightsOut>,
}

/// `--weights-out`: one JSON line per row with its per-target weights.
struct WeightsOut {
    path: String,
    file: BufWriter<File>,
}

/// What the user's loss gave on one batch, for the step simulation.
pub struct UserBatch {
    pub value: f64,
    /// Per-target weights `[B, T-1]` from the gradient, when there is one.
    pub weights: Option<Vec<f64>>,
}

impl LossAudit {
    pub fn new(loss: UserLoss, rtol: f64, probes: bool, pad_id: i64) -> Self {
        // The probes' random logits are seeded: the same run gives the same report.
        tch::manual_seed(0);
        Self {
            loss,
            diagnosis: Diagnosis::new(rtol),
            padding: ProbeResult::default(),
            masked_logits: ProbeResult::default(),
            probes,
            probed: 0,
            pad_id,
            gradients: vec![],
            gradient_scales: vec![],
            weights_out: None,
        }
    }

    /// Writes every row's weights into `file` (opened by the caller, who decides what becomes
    /// of it), named `shown` in messages.
    pub fn write_weights_to(&mut self, file: File, shown: &str) {
        self.weights_out = Some(WeightsOut {
            path: shown.to_string(),
            file: BufWriter::new(file),
        });
    }

    /// Compares the user's loss on one batch; `losses` are the batch's next-token losses
    /// (`[B, T-1]`) and `next` their sums under its mask, as `check` took them for the
    /// dataset's totals.
    pub fn observe(
        &mut self,
        model: &dyn LoadedModel,
        batch: &Batch,
        tensors: &BatchTensors,
        logits: &Tensor,
        (losses, next): (&[f32], &BatchSums),
        num_items: i64,
    ) -> anyhow::Result<UserBatch> {
        let device = logits.device();
        let mask = Tensor::f_from_slice(&batch.mask)?
            .f_to_kind(Kind::Int64)?
            .f_view([batch.rows as i64, batch.seq_len as i64])?
            .f_to_device(device)?;
        let inputs = LossTensors::new(
            logits,
            &tensors.input_ids,
            &tensors.attention_mask,
            &mask,
            num_items,
        );
        // Targets at t and at t+2. On the CPU one log-sum-exp per position serves both, and
        // the weight map; elsewhere one log-softmax of the logits serves both.
        let lse = crate::loss::fused_ce::log_sum_exp(logits);
        let (unshifted, double) = misaligned_losses(logits, lse.as_deref(), batch, tensors)?;
        let (user, grad) = if self.loss.takes_logits() {
            self.loss.call_with_gradient(model, &inputs)?
        } else {
            (self.loss.call(model, &inputs)?, None)
        };
        let rescale = self.rescale(num_items, next);
        let weights = match grad {
            Some(grad) => {
                // The weights of a formula at scale 1 are the formula, rescaled like the
                // value; a batch with nothing trained says nothing of it (NaN, skipped).
                let scale = if next.trained > 0 {
                    1.0 / rescale
                } else {
                    f64::NAN
                };
                self.gradient_scales.push(scale);
                Some(self.weigh(batch, logits, &grad, &tensors.input_ids, lse.as_deref())?)
            }
            None => None,
        };
        let compared = user * rescale;

        let double_mask = batch.shifted_mask(2);
        let hypotheses = batch_hypotheses(&BatchLosses {
            rows: batch.rows,
            next: *next,
            // Shift 0: every position's own token, the mask as it is.
            unshifted: (&unshifted, &batch.mask),
            double_shifted: (&double, &double_mask),
        });
        let tolerances = tolerances(logits, batch, &hypotheses, [losses, &unshifted, &double])?;
        self.diagnosis.observe(compared, &hypotheses, &tolerances);

        let trained = hypotheses[Hypothesis::MaskedTokenMean.index()].is_some();
        if self.probes && trained && self.probed < PROBE_BATCHES {
            self.probed += 1;
            // A correct loss moves by no more than its own rounding, rescaled as compared.
            let tolerance =
                tolerances[Hypothesis::MaskedTokenMean.index()].unwrap_or(0.0) / rescale;
            self.probe(model, &inputs, user, batch.seq_len as i64, tolerance)?;
        }
        Ok(UserBatch {
            value: user,
            weights,
        })
    }

    /// What the user's value is multiplied by to compare it with the batch's formulas: a loss
    /// given num_items_in_batch divides by the step's count, not the batch's; scaled back to
    /// the batch, the right one is a token mean like any other.
    fn rescale(&self, num_items: i64, next: &BatchSums) -> f64 {
        if self.loss.args.contains(&LossArg::NumItemsInBatch) && next.trained > 0 {
            num_items as f64 / next.trained as f64
        } else {
            1.0
        }
    }

    /// The weight map of one batch: recovered, analysed, written out if asked.
    fn weigh(
        &mut self,
        batch: &Batch,
        logits: &Tensor,
        grad: &Tensor,
        input_ids: &Tensor,
        lse: Option<&[f32]>,
    ) -> anyhow::Result<Vec<f64>> {
        let w = crate::loss::weights::recover(
            logits,
            grad,
            input_ids,
            lse,
            crate::loss::CHUNK_ELEMENTS,
        )?;
        let mask = batch.target_mask();
        let padding = batch.padding_target_mask();
        let line = batch.lines.first().copied().unwrap_or(0);
        self.gradients
            .push(weights::analyse(&w, &mask, &padding, batch.rows, line));
        if let Some(out) = &mut self.weights_out {
            let per_row = batch.seq_len.saturating_sub(1);
            for (r, &row_line) in batch.lines.iter().enumerate() {
                let span = r * per_row..(r + 1) * per_row;
                let record = serde_json::json!({
                    "line": row_line,
                    "mask": &mask[span.clone()],
                    "padding": &padding[span.clone()],
                    "weight": &w.weights[span.clone()],
                    "residual": &w.residuals[span.clone()],
                    "residual_tolerance": &w.tolerances[span],
                });
                writeln!(out.file, "{record}")
                    .map_err(|e| anyhow::anyhow!("--weights-out {}: {e}", out.path))?;
            }
        }
        Ok(w.weights)
    }

    /// The invariance probes on one batch. A loss that fails on a probe's input fails the run:
    /// a correct loss takes any number of padding columns and any logits where nothing is
    /// trained.
    fn probe(
        &mut self,
        model: &dyn LoadedModel,
        inputs: &LossTensors,
        user: f64,
        seq_len: i64,
        tolerance: f64,
    ) -> anyhow::Result<()> {
        let rtol = self.diagnosis.rtol();
        let extra = self.padding_room(model, seq_len);
        if extra > 0 {
            let padded = inputs.with_padding(extra, self.pad_id)?;
            let value = self.loss.call(model, &padded).map_err(|e| {
                anyhow::anyhow!("{e} (the padding probe: {extra} padding columns appended)")
            })?;
            self.padding.record(user, value, tolerance, rtol);
        } else if self.padding.note.is_empty() {
            self.padding.note =
                "not run on a batch at the model's position limit: no room for padding".into();
        }
        if self.loss.takes_logits() {
            let randomised = inputs.with_untrained_logits_randomised()?;
            let value = self.loss.call(model, &randomised).map_err(|e| {
                anyhow::anyhow!(
                    "{e} (the masked-logits probe: random logits where nothing is trained)"
                )
            })?;
            self.masked_logits.record(user, value, tolerance, rtol);
        }
        Ok(())
    }

    /// Padding columns the padding probe appends: half the batch's length, at least 8; for a
    /// method of the model (which runs the model on the longer rows), no further than the
    /// position limit its exporter recorded.
    fn padding_room(&self, model: &dyn LoadedModel, seq_len: i64) -> i64 {
        let extra = (seq_len / 2).max(8);
        let limit = match self.loss.source {
            Source::Method { .. } => model.record().and_then(|r| r.position_limit()),
            Source::Module { .. } => None,
        };
        match limit {
            Some(limit) => extra.min(limit - seq_len).max(0),
            None => extra,
        }
    }

    /// The report and the findings. `sequence_gap`: the dataset's sequence mean vs token mean.
    pub fn finish(
        mut self,
        sequence_gap: Option<f64>,
    ) -> anyhow::Result<(UserLossReport, Vec<Finding>)> {
        if let Some(mut out) = self.weights_out.take() {
            out.file
                .flush()
                .map_err(|e| anyhow::anyhow!("--weights-out {}: {e}", out.path))?;
        }
        self.padding.finish();
        self.masked_logits.finish();
        if !self.probes {
            self.padding = ProbeResult::skipped("--no-probes");
            self.masked_logits = ProbeResult::skipped("--no-probes");
        } else {
            if self.padding.ran {
                self.padding.note = padding_note(&self.padding.note);
            }
            if !self.loss.takes_logits() {
                self.masked_logits = ProbeResult::skipped("the loss takes no logits");
            } else if self.masked_logits.ran {
                self.masked_logits.note =
                    "randomised the logits at positions that predict no trained target".into();
            }
        }
        let note = if !self.loss.takes_logits() {
            "the loss takes no logits: no gradient to weigh".to_string()
        } else if self.gradients.is_empty() {
            "the loss's value does not depend on the logits through autograd".to_string()
        } else {
            String::new()
        };
        let gradient = GradientSummary::of(std::mem::take(&mut self.gradients), note);
        let evidence = weights::Evidence {
            batches: &gradient.batches,
            scales: &self.gradient_scales,
        };
        let conclusion = diagnosis::conclude(&self.diagnosis, &self.padding, &evidence);
        let mut findings = diagnosis::findings(
            &conclusion,
            &self.diagnosis,
            &self.padding,
            &self.masked_logits,
            sequence_gap,
        );
        findings.extend(gradient_findings(&gradient));
        let (matched, candidates, error_of) = match &conclusion {
            Conclusion::Matched(h) => (Some(h.name()), vec![h.name()], Some(*h)),
            Conclusion::Ambiguous(hs) => (None, hs.iter().map(|h| h.name()).collect(), None),
            Conclusion::NoMatch { closest } => (None, vec![], closest.map(|c| c.0)),
            Conclusion::NoBatches => (None, vec![], None),
        };
        let report = UserLossReport {
            source: self.loss.source_name(),
            args: self.loss.args().iter().map(|a| a.name()).collect(),
            value: self.diagnosis.user_mean(),
            reference: self.diagnosis.reference_mean(),
            matched,
            candidates,
            max_relative_error: error_of.map(|h| self.diagnosis.max_relative_error(h)),
            rtol: self.diagnosis.rtol(),
            max_relative_tolerance: (self.diagnosis.batches() > 0)
                .then(|| self.diagnosis.max_relative_tolerance()),
            batches: self.diagnosis.batches(),
            verdict: diagnosis::verdict_sentence(&conclusion, &self.diagnosis),
            hypotheses: self.diagnosis.summary(),
            probes: Probes {
                padding: self.padding,
                masked_logits: self.masked_logits,
            },
            gradient,
            aggregation: None,
            policy: None,
        };
        Ok((report, findings))
    }
}

/// Each hypothesis's absolute tolerance on one batch: the formula applied to the
/// `weights::log_softmax_error` of every position and target (|lse| bounded by max|z| + ln V;
/// the losses of the three alignments, `next`, `unshifted` and `double`, for the drift), plus
/// the rounding of a float32 sum over the batch's positions.
fn tolerances(
    logits: &Tensor,
    batch: &Batch,
    values: &[Option<f64>; 7],
    losses: [&[f32]; 3],
) -> anyhow::Result<[Option<f64>; 7]> {
    let v = logits.size()[2];
    let (lo, hi) = logits.f_aminmax(-1, false)?;
    let big = lo.f_abs()?.f_maximum(&hi.f_abs()?)?;
    let big = Vec::<f32>::try_from(big.f_to_device(Device::Cpu)?.f_flatten(0, -1)?)?;
    let ln_v = (v as f64).ln();
    let t = batch.seq_len;
    // Shifts 1, 0 and 2: the error of each position's log-softmax against its target there.
    let [next, unshifted, double] = [(1, losses[0]), (0, losses[1]), (2, losses[2])].map(
        |(shift, loss): (usize, &[f32])| -> Vec<f32> {
            let n = t.saturating_sub(shift);
            (0..batch.rows)
                .flat_map(|r| (0..n).map(move |p| (r, p)))
                .zip(loss)
                .map(|((r, p), &l)| {
                    let m = f64::from(big[r * t + p]);
                    weights::log_softmax_error(m + ln_v, m, v as usize, f64::from(l)) as f32
                })
                .collect()
        },
    );
    let target_mask = batch.target_mask();
    let double_mask = batch.shifted_mask(2);
    let errors = BatchLosses {
        rows: batch.rows,
        next: BatchSums::of(&next, &target_mask, batch.rows),
        unshifted: (&unshifted, &batch.mask),
        double_shifted: (&double, &double_mask),
    };
    Ok(diagnosis::tolerances(&errors, values, batch.positions()))
}

/// The per-token losses of a batch against the token at t (no shift) and at t+2 (a double
/// shift), as host vectors: from the log-sum-exp when the CPU's fused kernel gave one, else
/// with libtorch's kernels.
fn misaligned_losses(
    logits: &Tensor,
    lse: Option<&[f32]>,
    batch: &Batch,
    tensors: &BatchTensors,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let from_lse = lse.and_then(|lse| {
        let shifted =
            |shift| crate::loss::fused_ce::shifted_from_lse(logits, lse, &batch.input_ids, shift);
        shifted(0).zip(shifted(2))
    });
    if let Some(pair) = from_lse {
        return Ok(pair);
    }
    let shifted = crate::loss::shifted_token_losses_each(
        logits,
        &tensors.input_ids,
        &[0, 2],
        crate::loss::CHUNK_ELEMENTS,
    )?
    .ok_or_else(|| anyhow::anyhow!("non-finite logits"))?;
    let host = |losses: &Tensor| -> anyhow::Result<Vec<f32>> {
        Ok(Vec::try_from(
            losses.f_to_device(Device::Cpu)?.f_flatten(0, -1)?,
        )?)
    };
    Ok((host(&shifted[0])?, host(&shifted[1])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        record::ExportRecord, ArgsSource, ForwardArg, LanguageModel, OutputForm, Signature,
    };

    /// A model of a format with no TorchScript module behind it.
    struct NotTorchScript(Signature);

    impl LanguageModel for NotTorchScript {
        fn vocab_size(&self) -> i64 {
            5
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn logits(&self, ids: &Tensor, _: &Tensor) -> Result<Tensor, ModelError> {
            Ok(ids.f_zeros_like()?.f_to_kind(Kind::Float)?)
        }
    }

    impl LoadedModel for NotTorchScript {
        fn path(&self) -> &str {
            "m.pte"
        }
        fn signature(&self) -> &Signature {
            &self.0
        }
        fn output_form(&self) -> OutputForm {
            OutputForm::Tensor
        }
        fn dtype(&self) -> &str {
            "float32"
        }
        fn run_kind(&self) -> Kind {
            Kind::Float
        }
        fn record(&self) -> Option<&ExportRecord> {
            None
        }
        fn torchscript(&self) -> Option<&tch::CModule> {
            None
        }
    }

    #[test]
    fn a_loss_method_needs_a_torchscript_model() {
        let model = NotTorchScript(Signature {
            args: vec![ForwardArg::InputIds],
            source: ArgsSource::Probe,
            note: String::new(),
        });
        let loss = UserLoss::method("loss", Path::new("m.pte"), vec![LossArg::InputIds]);
        let ids = Tensor::from_slice(&[1i64, 2, 3]).view([1, 3]);
        let logits = Tensor::zeros([1, 3, 5], (Kind::Float, Device::Cpu));
        let inputs = LossTensors::new(&logits, &ids, &ids.ones_like(), &ids.ones_like(), 2);
        let err = loss.call(&model, &inputs).unwrap_err().to_string();
        assert!(
            err.contains("--loss-method loss: the model is not TorchScript"),
            "{err}"
        );
    }

    #[test]
    fn a_failed_padded_batch_stays_in_the_note() {
        assert_eq!(
            padding_note(""),
            "appended padding columns (pad id, mask 0, random logits)"
        );
        let note = padding_note("the loss failed on the padded batch: too long");
        assert!(note.starts_with("appended padding columns"), "{note}");
        assert!(
            note.ends_with("the loss failed on the padded batch: too long"),
            "{note}"
        );
    }
}
