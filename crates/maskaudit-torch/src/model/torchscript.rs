//! The TorchScript implementation of [`super::LanguageModel`].

use std::path::Path;

use tch::{CModule, Device, IValue, Kind, Tensor};

use super::record::{self, ExportRecord, FileKind};
use super::{
    torch_message, ArgsSource, ForwardArg, LanguageModel, LoadedModel, ModelError, OutputForm,
    Signature,
};

/// Where the forward's arguments come from when the file carries no record.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub forward_args: Option<(Vec<ForwardArg>, ArgsSource)>,
    /// `--dtype`: the kind to convert the parameters to; `None` keeps the model's own.
    pub dtype: Option<Kind>,
}

/// A TorchScript causal LM.
pub struct TorchScriptLm {
    module: CModule,
    path: String,
    device: Device,
    vocab_size: i64,
    signature: Signature,
    output_form: OutputForm,
    dtype: String,
    /// The dtype the forward runs in: `dtype`, or what `--dtype` converted the module to.
    run_kind: Kind,
    record: Option<ExportRecord>,
}

/// Loads a TorchScript file in eval mode, with errors that name the file and say what it is
/// when it is not TorchScript.
pub fn load_module(path: &Path, device: Device) -> Result<CModule, ModelError> {
    record::inspect(path)?;
    open_module(path, device)
}

fn open_module(path: &Path, device: Device) -> Result<CModule, ModelError> {
    let mut module =
        CModule::load_on_device(path, device).map_err(|e| ModelError::NotTorchScript {
            path: path.display().to_string(),
            message: torch_message(&e.to_string()),
        })?;
    module.set_eval();
    Ok(module)
}

/// Converts the module's floating-point parameters and buffers to `kind` (`--dtype`).
/// libtorch reports a failure by a panic in tch's wrapper; it is caught quietly (no panic
/// message on the terminal) and becomes an error naming the file.
fn convert_module(
    module: &mut CModule,
    device: Device,
    kind: Kind,
    path: &str,
) -> Result<(), ModelError> {
    crate::data::guard::catch(|| module.to(device, kind, false)).map_err(|panic| {
        ModelError::Convert {
            path: path.to_string(),
            dtype: kind_name(kind).to_string(),
            message: torch_message(&panic),
        }
    })
}

/// What the first call with a two-token input showed.
struct FirstCall {
    vocab_size: i64,
    output_form: OutputForm,
    kind: Kind,
}

/// Why a call with probe inputs gave no logits.
enum CallError {
    Threw(String),
    Output(String),
}

impl TorchScriptLm {
    /// Loads the module and learns its signature (from the exporter's record, the options, or
    /// probe calls, in that order), output form, vocabulary size and dtype.
    pub fn load(path: &Path, device: Device, opts: &LoadOptions) -> Result<Self, ModelError> {
        let display = path.display().to_string();
        let record = match record::inspect(path)? {
            FileKind::TorchScript(record) => record.map(|r| *r),
            FileKind::Unknown => None,
        };
        let mut module = open_module(path, device)?;
        // The model's own dtype, before any conversion: the record's, else the parameters'.
        let own_dtype = record
            .as_ref()
            .and_then(|r| r.dtype.clone())
            .or_else(|| parameter_dtype(&module));
        let own_kind = own_dtype.as_deref().and_then(super::kind_of_name);
        let converted = match opts.dtype {
            Some(kind) if own_kind != Some(kind) => {
                convert_module(&mut module, device, kind, &display)?;
                Some(kind)
            }
            _ => None,
        };
        let found = match named_args(record.as_ref(), opts, &display)? {
            Some((args, source, note)) => {
                named_signature(&module, args, source, note, device, &display)
            }
            None => probe_signature(&module, device, &display),
        }
        .map_err(|e| traced_elsewhere(e, record.as_ref(), device));
        let (signature, first) = match (found, converted) {
            (Ok(found), _) => found,
            (Err(e), None) => return Err(e),
            // A trace can hard-code its dtype (a causal mask or rotary table built in float32).
            (Err(e), Some(kind)) => {
                return Err(ModelError::ForwardArgs {
                    path: display.clone(),
                    message: format!(
                        "converted from {} to {} (--dtype), the model fails: {e}; export it in that dtype (maskaudit-export --dtype {}) or run it in its own (--dtype auto)",
                        own_dtype.as_deref().unwrap_or("its dtype"),
                        kind_name(kind),
                        kind_name(kind)
                    ),
                })
            }
        };
        if let Some(v) = record.as_ref().and_then(|r| r.vocab_size) {
            if v != first.vocab_size {
                return Err(ModelError::BadRecord {
                    path: display,
                    message: format!(
                        "it says vocab_size {v} but the logits have {} entries",
                        first.vocab_size
                    ),
                });
            }
        }
        let dtype = own_dtype.unwrap_or_else(|| kind_name(first.kind).to_string());
        let run_kind = converted
            .or(own_kind)
            .or_else(|| {
                parameter_dtype(&module)
                    .as_deref()
                    .and_then(super::kind_of_name)
            })
            .unwrap_or(first.kind);
        Ok(Self {
            module,
            path: display,
            device,
            vocab_size: first.vocab_size,
            signature,
            output_form: first.output_form,
            dtype,
            run_kind,
            record,
        })
    }
}

/// A forward that fails on a device other than the one its record says it was traced on: the
/// likely cause, said. Tracing fixes the device of every tensor the model creates (a causal
/// mask, position ids, a rotary table), so a Hugging Face model traced on the CPU fails on a
/// GPU ("Expected all tensors to be on the same device") and the reverse.
fn traced_elsewhere(e: ModelError, record: Option<&ExportRecord>, device: Device) -> ModelError {
    let kind = if device.is_cuda() { "cuda" } else { "cpu" };
    match (e, record) {
        (ModelError::ForwardArgs { path, message }, Some(r)) if r.trace_device() != kind => {
            ModelError::ForwardArgs {
                path,
                message: format!(
                    "{message}; it was traced on {} and runs on {}: a trace keeps the device of the tensors it creates, so export it on this device (make export MODEL=… OUT=… EXPORT_ARGS='--device {kind}')",
                    r.trace_device(),
                    super::device_name(device)
                ),
            }
        }
        (e, _) => e,
    }
}

/// Arguments, who named them, and the report's note saying so.
type NamedArgs = (Vec<ForwardArg>, ArgsSource, &'static str);

/// The forward's arguments when something names them: the exporter's record, else
/// `--loss-args` of `--loss-method forward`, else `--forward-args`; with how they were named.
fn named_args(
    record: Option<&ExportRecord>,
    opts: &LoadOptions,
    path: &str,
) -> Result<Option<NamedArgs>, ModelError> {
    Ok(match (record, &opts.forward_args) {
        (Some(r), _) => Some((
            record_args(r, path)?,
            ArgsSource::Record,
            "named by the maskaudit-export record",
        )),
        (None, Some((args, ArgsSource::LossArgs))) => Some((
            args.clone(),
            ArgsSource::LossArgs,
            "named by --loss-args (--loss-method forward)",
        )),
        (None, Some((args, source))) => Some((args.clone(), *source, "named by --forward-args")),
        (None, None) => None,
    })
}

/// The signature of named arguments, checked by a first call with them.
fn named_signature(
    module: &CModule,
    args: Vec<ForwardArg>,
    source: ArgsSource,
    note: &str,
    device: Device,
    path: &str,
) -> Result<(Signature, FirstCall), ModelError> {
    check_args(&args).map_err(|message| ModelError::ForwardArgs {
        path: path.to_string(),
        message,
    })?;
    let first = first_call(module, &args, device).map_err(|e| {
        let (CallError::Threw(m) | CallError::Output(m)) = e;
        ModelError::ForwardArgs {
            path: path.to_string(),
            message: format!(
                "{} ({note}) fails: {m}",
                Signature {
                    args: args.clone(),
                    source,
                    note: String::new()
                }
            ),
        }
    })?;
    let signature = Signature {
        args,
        source,
        note: note.to_string(),
    };
    Ok((signature, first))
}

fn record_args(record: &ExportRecord, path: &str) -> Result<Vec<ForwardArg>, ModelError> {
    record
        .forward_args
        .iter()
        .map(|name| name.parse::<ForwardArg>())
        .collect::<Result<_, _>>()
        .map_err(|message| ModelError::BadRecord {
            path: path.to_string(),
            message,
        })
}

/// input_ids first, each name once.
fn check_args(args: &[ForwardArg]) -> Result<(), String> {
    if args.first() != Some(&ForwardArg::InputIds) {
        return Err("the forward's first argument must be input_ids".into());
    }
    for (i, a) in args.iter().enumerate() {
        if args[..i].contains(a) {
            return Err(format!("forward argument {a} is named twice"));
        }
    }
    Ok(())
}

/// The forward's inputs for a batch, built from its ids, attention mask and, when given, its
/// rows' position ids (else 0, 1, … along each row). Every tensor is a fresh copy: a forward
/// that writes into its inputs cannot change maskaudit's.
pub fn forward_inputs(
    args: &[ForwardArg],
    input_ids: &Tensor,
    attention_mask: &Tensor,
    position_ids: Option<&Tensor>,
) -> Result<Vec<IValue>, tch::TchError> {
    let copy = super::fresh_copy;
    args.iter()
        .map(|arg| {
            Ok(IValue::Tensor(match arg {
                ForwardArg::InputIds => copy(input_ids)?,
                ForwardArg::AttentionMask => copy(attention_mask)?,
                ForwardArg::PositionIds if position_ids.is_some() => {
                    copy(position_ids.expect("matched as Some"))?
                }
                ForwardArg::PositionIds => {
                    let size = input_ids.size();
                    Tensor::f_arange(size[1], (Kind::Int64, input_ids.device()))?
                        .f_expand([size[0], size[1]], false)?
                        .f_contiguous()?
                }
                ForwardArg::Labels => input_ids.f_masked_fill(&attention_mask.f_eq(0)?, -100)?,
            }))
        })
        .collect()
}

fn call(
    module: &CModule,
    args: &[ForwardArg],
    input_ids: &Tensor,
    second: &Tensor,
) -> Result<IValue, tch::TchError> {
    module.forward_is(&forward_inputs(args, input_ids, second, None)?)
}

/// One call with a two-token input: the vocabulary size and where the logits are.
fn first_call(
    module: &CModule,
    args: &[ForwardArg],
    device: Device,
) -> Result<FirstCall, CallError> {
    let threw = |e: tch::TchError| CallError::Threw(torch_message(&e.to_string()));
    let ids = Tensor::f_zeros([1, 2], (Kind::Int64, device)).map_err(threw)?;
    let mask = ids.f_ones_like().map_err(threw)?;
    let out = call(module, args, &ids, &mask).map_err(threw)?;
    let (logits, output_form) = extract_logits(out).map_err(CallError::Output)?;
    let size = logits.size();
    if size.len() == 3 && size[..2] == [1, 2] && logits.is_floating_point() {
        Ok(FirstCall {
            vocab_size: size[2],
            output_form,
            kind: logits.kind(),
        })
    } else {
        Err(CallError::Output(format!(
            "a {:?} tensor of shape {size:?} for input_ids of shape [1, 2]",
            logits.kind()
        )))
    }
}

/// Tries `forward(input_ids, ·)`, `forward(input_ids)` and `forward(input_ids, ·, ·)`; a
/// second tensor is identified by [`identify_second`], a third is never guessed.
fn probe_signature(
    module: &CModule,
    device: Device,
    path: &str,
) -> Result<(Signature, FirstCall), ModelError> {
    use ForwardArg::*;
    let mut tried = vec![];
    let mut bad_output = None;
    for args in [
        vec![InputIds, AttentionMask],
        vec![InputIds],
        vec![InputIds, AttentionMask, Labels],
    ] {
        let shape = format!("forward with {} tensor(s)", args.len());
        match first_call(module, &args, device) {
            Ok(first) => {
                let signature = match args.len() {
                    1 => Signature {
                        args,
                        source: ArgsSource::Probe,
                        note: "the forward takes input_ids alone".into(),
                    },
                    2 => identify_second(module, device, &first, path)?,
                    _ => {
                        return Err(ModelError::ForwardArgs {
                            path: path.to_string(),
                            message: "the forward takes three tensors, which maskaudit does not guess: name them with --forward-args (e.g. input_ids,attention_mask,labels), or export the model with maskaudit-export".into(),
                        })
                    }
                };
                return Ok((signature, first));
            }
            Err(CallError::Threw(m)) => tried.push(format!("{shape}: {m}")),
            Err(CallError::Output(found)) => {
                tried.push(format!("{shape}: returned {found}"));
                bad_output.get_or_insert(found);
            }
        }
    }
    // A forward that took the arguments and then failed says more than the arity mismatches.
    let real: Vec<&String> = tried.iter().filter(|t| !is_arity_mismatch(t)).collect();
    Err(match bad_output {
        Some(found) => ModelError::Output {
            path: path.to_string(),
            found,
        },
        None if real.len() == 1 => ModelError::Signature {
            path: path.to_string(),
            tried: real[0].clone(),
        },
        None => ModelError::Signature {
            path: path.to_string(),
            tried: tried.join("; "),
        },
    })
}

/// TorchScript's complaints about the number of arguments, as opposed to a forward that ran
/// and failed.
fn is_arity_mismatch(message: &str) -> bool {
    message.contains("argument(s) for operator 'forward'")
        || message.contains("is missing value for argument")
}

/// Length of the probe row.
const PROBE_LEN: i64 = 8;

/// What a forward's second tensor is, from four calls on one row of [`PROBE_LEN`] tokens with
/// the second tensor set to: ones (M), 0..L (P), [0, 1, 1, …] (Q) and 3..L+3 (S).
/// - M = P: the tensor does not reach the logits. With a loss first in the output it is the
///   labels; otherwise it is passed as the attention mask, which then cannot matter.
/// - Q = P past position 0: only zero vs non-zero matters, as for an attention mask (a key
///   with mask 0 is hidden; values 1, 2, … all show it).
/// - S = P: shifting every value leaves the logits alone, while 0 vs 1 matters: relative
///   position ids (rotary embeddings).
/// - Otherwise (absolute position ids among them: GPT-2's learned positions) maskaudit cannot
///   tell, and says how to name it: treating position ids as a mask puts every token at
///   position 1, and the losses are wrong without a sign.
fn identify_second(
    module: &CModule,
    device: Device,
    first: &FirstCall,
    path: &str,
) -> Result<Signature, ModelError> {
    use ForwardArg::*;
    let run = |second: &Tensor| -> Result<Tensor, ModelError> {
        let ids = (Tensor::f_arange(PROBE_LEN, (Kind::Int64, device))?.f_mul_scalar(7)? + 3)
            .f_remainder(first.vocab_size)?
            .f_view([1, PROBE_LEN])?;
        let out = call(module, &[InputIds, AttentionMask], &ids, second).map_err(|e| {
            ModelError::ForwardArgs {
                path: path.to_string(),
                message: format!(
                    "probing what the forward's second tensor is, the forward failed: {}; name it with --forward-args",
                    torch_message(&e.to_string())
                ),
            }
        })?;
        let (logits, _) = extract_logits(out).map_err(|found| ModelError::Output {
            path: path.to_string(),
            found,
        })?;
        Ok(logits.f_to_kind(Kind::Double)?)
    };
    let row = |values: Tensor| -> Result<Tensor, tch::TchError> { values.f_view([1, PROBE_LEN]) };
    let arange = Tensor::f_arange(PROBE_LEN, (Kind::Int64, device))?;
    let tol = logit_tolerance(first.kind);
    let m = run(&row(arange.f_ones_like()?)?)?;
    let p = run(&row(arange.shallow_clone())?)?;
    let signature = |second: ForwardArg, note: &str| Signature {
        args: vec![InputIds, second],
        source: ArgsSource::Probe,
        note: note.to_string(),
    };
    if max_relative_difference(&m, &p, None)? <= tol {
        return Ok(if first.output_form == OutputForm::LossThenLogits {
            signature(
                Labels,
                "probed: the second tensor does not change the logits, and the output starts with a loss: labels",
            )
        } else {
            signature(
                AttentionMask,
                "probed: the second tensor does not change the logits; passed as the attention mask",
            )
        });
    }
    let q = run(&row(arange.f_clamp_max(1)?)?)?;
    let past_first = |t: &Tensor| t.f_narrow(1, 1, PROBE_LEN - 1);
    if max_relative_difference(&past_first(&q)?, &past_first(&p)?, None)? <= tol {
        return Ok(signature(
            AttentionMask,
            "probed: only zero vs non-zero in the second tensor changes the logits: an attention mask",
        ));
    }
    let s = run(&row(arange.f_add_scalar(3)?)?)?;
    if max_relative_difference(&s, &p, None)? <= tol {
        return Ok(signature(
            PositionIds,
            "probed: shifting the second tensor's values leaves the logits unchanged, 0 vs 1 does not: relative position ids",
        ));
    }
    Err(ModelError::ForwardArgs {
        path: path.to_string(),
        message: "the forward's second tensor behaves neither as an attention mask nor as relative position ids, and a wrong guess gives wrong losses without a sign: name it with --forward-args input_ids,attention_mask or --forward-args input_ids,position_ids (or export the model with maskaudit-export)".into(),
    })
}

/// Relative tolerance on logits for calls that should agree: batched and single-row matrix
/// products round differently, more so in half precision.
pub fn logit_tolerance(kind: Kind) -> f64 {
    match kind {
        Kind::Half | Kind::BFloat16 => 3e-2,
        _ => 1e-4,
    }
}

/// The largest difference of two tensors relative to the first's scale (the exporter's
/// `max_relative_difference`, unsigned; a scalar's signed change is
/// `maskaudit_core::loss::aggregate::relative_change`): max |a − b| / max |a| over the
/// positions where `keep` (`[B, T]`, bool) is true, or all of
/// them; infinite when either holds a NaN or an infinity there.
pub fn max_relative_difference(
    a: &Tensor,
    b: &Tensor,
    keep: Option<&Tensor>,
) -> Result<f64, tch::TchError> {
    let (diff, scale) = difference_and_scale(a, b, keep)?;
    let scale = scale.max(1e-6);
    Ok(if diff.is_finite() && scale.is_finite() {
        diff / scale
    } else {
        f64::INFINITY
    })
}

/// max |a − b| and max |a| for [`max_relative_difference`], a row (first dimension) at a time for
/// `[B, T, V]` logits: the float64 copies it compares are then one row's, not the batch's
/// (with a 152k vocabulary, 2.5 GB per row of 2048 positions, against B times that).
fn difference_and_scale(
    a: &Tensor,
    b: &Tensor,
    keep: Option<&Tensor>,
) -> Result<(f64, f64), tch::TchError> {
    if a.dim() == 3 && a.size()[0] > 1 {
        let (mut diff, mut scale) = (0f64, 0f64);
        for row in 0..a.size()[0] {
            let keep_row = keep.map(|k| k.f_narrow(0, row, 1)).transpose()?;
            let (d, s) = difference_and_scale_whole(
                &a.f_narrow(0, row, 1)?,
                &b.f_narrow(0, row, 1)?,
                keep_row.as_ref(),
            )?;
            // NaN stays NaN (f64::max would drop it).
            diff = if d.is_nan() || diff.is_nan() {
                f64::NAN
            } else {
                diff.max(d)
            };
            scale = if s.is_nan() || scale.is_nan() {
                f64::NAN
            } else {
                scale.max(s)
            };
        }
        return Ok((diff, scale));
    }
    difference_and_scale_whole(a, b, keep)
}

fn difference_and_scale_whole(
    a: &Tensor,
    b: &Tensor,
    keep: Option<&Tensor>,
) -> Result<(f64, f64), tch::TchError> {
    if a.numel() == 0 {
        return Ok((0.0, 0.0));
    }
    if let Some(found) = host_difference_and_scale(a, b, keep)? {
        return Ok(found);
    }
    // In f32 (half-precision logits are upcast): a difference of two f32 values rounds at
    // 6e-8, far below any tolerance. Positions not kept are zeroed with masked_fill, which
    // also drops a NaN there; no boolean indexing, which would copy.
    let kind = if a.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    };
    let a = a.f_to_kind(kind)?;
    let mut diff = a.f_sub(&b.f_to_kind(kind)?)?;
    let _ = diff.f_abs_()?;
    let mut mag = a.f_abs()?;
    if let Some(keep) = keep {
        let drop = keep.f_logical_not()?.f_unsqueeze(-1)?;
        let _ = diff.f_masked_fill_(&drop, 0.0)?;
        let _ = mag.f_masked_fill_(&drop, 0.0)?;
    }
    let diff = f64::try_from(diff.f_max()?.f_to_kind(Kind::Double)?)?;
    let scale = f64::try_from(mag.f_max()?.f_to_kind(Kind::Double)?)?;
    Ok((diff, scale))
}

/// [`difference_and_scale_whole`] in one pass over contiguous f32 host logits of one shape,
/// without its two temporaries of the logits' size: each is a fresh allocation whose pages the
/// kernel zeroes, which on the development machine cost the CPU probe more than its compare.
/// `None` for other tensors. Any non-finite value at a kept position (or a difference that
/// overflows) makes both results NaN, as the tensor path's maximum does.
fn host_difference_and_scale(
    a: &Tensor,
    b: &Tensor,
    keep: Option<&Tensor>,
) -> Result<Option<(f64, f64)>, tch::TchError> {
    // SAFETY: `a` and `b` are this probe's own logits: nothing else holds them, and they are
    // only read until this function returns.
    let (Some(x), Some(y)) = (unsafe { super::host_f32(a) }, unsafe { super::host_f32(b) }) else {
        return Ok(None);
    };
    let v = a.size().last().copied().unwrap_or(1).max(1) as usize;
    if a.size() != b.size() || x.len() % v != 0 {
        return Ok(None);
    }
    let keep = match keep {
        Some(k) => Vec::<bool>::try_from(k.f_flatten(0, -1)?.f_to_kind(Kind::Bool)?)?,
        None => vec![true; x.len() / v],
    };
    if keep.len() != x.len() / v {
        return Ok(None);
    }
    // Independent lanes, and comparisons rather than f32::max (whose NaN rule keeps the
    // compiler from vectorising): the pass then runs at the memory's speed.
    const LANES: usize = 16;
    let (mut diff, mut scale, mut poison) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    let mut add = |l: usize, xa: f32, yb: f32| {
        let d = xa - yb;
        let (ad, ax) = (d.abs(), xa.abs());
        diff[l] = if ad > diff[l] { ad } else { diff[l] };
        scale[l] = if ax > scale[l] { ax } else { scale[l] };
        // NaN exactly when the difference is not finite (NaN or infinite operands).
        poison[l] += d * 0.0;
    };
    for (p, _) in keep.iter().enumerate().filter(|(_, &k)| k) {
        let (xs, ys) = (&x[p * v..(p + 1) * v], &y[p * v..(p + 1) * v]);
        let (xc, yc) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
        for (i, (&xa, &yb)) in xc.remainder().iter().zip(yc.remainder()).enumerate() {
            add(i, xa, yb);
        }
        for (xl, yl) in xc.zip(yc) {
            for l in 0..LANES {
                add(l, xl[l], yl[l]);
            }
        }
    }
    let max = |lanes: &[f32]| lanes.iter().fold(0f32, |m, &a| if a > m { a } else { m });
    Ok(Some(if poison.iter().any(|p| p.is_nan()) {
        (f64::NAN, f64::NAN)
    } else {
        (f64::from(max(&diff)), f64::from(max(&scale)))
    }))
}

/// The dtype of the module's first floating-point parameter.
fn parameter_dtype(module: &CModule) -> Option<String> {
    let params = module.named_parameters().ok()?;
    params
        .iter()
        .find(|(_, t)| t.is_floating_point())
        .map(|(_, t)| kind_name(t.kind()).to_string())
}

/// PyTorch's name for a dtype.
pub fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::Half => "float16",
        Kind::BFloat16 => "bfloat16",
        Kind::Int64 => "int64",
        Kind::Int => "int32",
        Kind::Bool => "bool",
        _ => "other",
    }
}

/// Finds the logits tensor in a module's output, or says what came back instead.
pub fn extract_logits(out: IValue) -> Result<(Tensor, OutputForm), String> {
    match out {
        IValue::Tensor(t) => Ok((t, OutputForm::Tensor)),
        IValue::Tuple(items) | IValue::GenericList(items) => {
            let mut items = items.into_iter();
            match (items.next(), items.next()) {
                // A one-element first tensor followed by a [B, T, V] one: (loss, logits, …).
                (Some(IValue::Tensor(loss)), Some(IValue::Tensor(t)))
                    if loss.numel() == 1 && t.dim() == 3 =>
                {
                    Ok((t, OutputForm::LossThenLogits))
                }
                (Some(IValue::Tensor(t)), _) => Ok((t, OutputForm::TupleFirst)),
                (Some(other), _) => Err(format!(
                    "a tuple whose first element is {}",
                    describe(&other)
                )),
                (None, _) => Err("an empty tuple".into()),
            }
        }
        IValue::TensorList(items) => items
            .into_iter()
            .next()
            .map(|t| (t, OutputForm::TupleFirst))
            .ok_or_else(|| "an empty list".into()),
        IValue::GenericDict(entries) => {
            let mut keys = vec![];
            for (k, v) in entries {
                match (k, v) {
                    (IValue::String(k), IValue::Tensor(t)) if k == "logits" => {
                        return Ok((t, OutputForm::DictLogits))
                    }
                    (IValue::String(k), _) => keys.push(k),
                    (other, _) => keys.push(describe(&other)),
                }
            }
            Err(format!(
                "a dict without a \"logits\" tensor (keys: {})",
                keys.join(", ")
            ))
        }
        other => Err(describe(&other)),
    }
}

/// A short description of an IValue for error messages.
pub fn describe(v: &IValue) -> String {
    match v {
        IValue::None => "None".into(),
        IValue::Tensor(t) => format!("a {:?} tensor of shape {:?}", t.kind(), t.size()),
        IValue::Double(x) => format!("the float {x}"),
        IValue::Int(x) => format!("the int {x}"),
        IValue::Bool(x) => format!("the bool {x}"),
        IValue::Tuple(v) => format!("a tuple of {} elements", v.len()),
        IValue::GenericList(v) => format!("a list of {} elements", v.len()),
        IValue::TensorList(v) => format!("a list of {} tensors", v.len()),
        IValue::GenericDict(v) => format!("a dict of {} entries", v.len()),
        IValue::String(_) => "a string".into(),
        IValue::IntList(_)
        | IValue::DoubleList(_)
        | IValue::BoolList(_)
        | IValue::StringList(_) => "a list".into(),
        IValue::Object(_) => "an object".into(),
        IValue::Device(_) => "a device".into(),
        _ => "an unsupported value".into(),
    }
}

impl LoadedModel for TorchScriptLm {
    fn path(&self) -> &str {
        &self.path
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn output_form(&self) -> OutputForm {
        self.output_form
    }

    fn dtype(&self) -> &str {
        &self.dtype
    }

    fn run_kind(&self) -> Kind {
        self.run_kind
    }

    fn record(&self) -> Option<&ExportRecord> {
        self.record.as_ref()
    }

    fn torchscript(&self) -> Option<&CModule> {
        Some(&self.module)
    }
}

impl LanguageModel for TorchScriptLm {
    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn device(&self) -> Device {
        self.device
    }

    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        self.forward_logits(input_ids, attention_mask, None)
    }

    fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
    ) -> Result<Tensor, ModelError> {
        self.forward_logits(input_ids, attention_mask, Some(position_ids))
    }

    fn keeps_documents_apart(&self) -> bool {
        self.signature.args.contains(&ForwardArg::PositionIds)
            && self
                .record
                .as_ref()
                .is_some_and(|r| r.layouts.iter().any(|l| l == "packed_position_ids"))
    }
}

impl TorchScriptLm {
    fn forward_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor, ModelError> {
        let inputs = forward_inputs(
            &self.signature.args,
            input_ids,
            attention_mask,
            position_ids,
        )?;
        let out = self.module.forward_is(&inputs)?;
        let (logits, _) = extract_logits(out).map_err(|found| ModelError::Output {
            path: self.path.clone(),
            found,
        })?;
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        let size = logits.size();
        if size != [b, t, self.vocab_size] || !logits.is_floating_point() {
            return Err(ModelError::Output {
                path: self.path.clone(),
                found: format!(
                    "a {:?} tensor of shape {size:?} for input_ids of shape [{b}, {t}]",
                    logits.kind()
                ),
            });
        }
        Ok(logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass host comparison gives what the tensor path gives (f64 copies of the same
    /// values take it), with and without a mask, with non-finite values kept and dropped.
    #[test]
    fn the_host_comparison_matches_the_tensor_path() {
        tch::manual_seed(5);
        let a = Tensor::randn([1, 6, 37], (Kind::Float, tch::Device::Cpu)) * 3.0;
        let b = &a + Tensor::randn([1, 6, 37], (Kind::Float, tch::Device::Cpu)) * 1e-3;
        let keep = Tensor::from_slice(&[true, true, false, true, false, true]).view([1, 6]);
        let poisoned = |t: &Tensor, at: i64, value: f64| {
            let t = t.copy();
            let _ = t.get(0).get(at).narrow(0, 11, 1).fill_(value);
            t
        };
        let cases = [
            (a.copy(), b.copy()),
            (poisoned(&a, 2, f64::NAN), b.copy()),
            (a.copy(), poisoned(&b, 4, f64::INFINITY)),
            (poisoned(&a, 1, f64::NEG_INFINITY), b.copy()),
            (
                poisoned(&a, 3, f64::INFINITY),
                poisoned(&b, 3, f64::INFINITY),
            ),
        ];
        for (i, (a, b)) in cases.iter().enumerate() {
            for keep in [None, Some(&keep)] {
                let host = host_difference_and_scale(a, b, keep).unwrap().unwrap();
                let (ad, bd) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
                assert!(host_difference_and_scale(&ad, &bd, keep).unwrap().is_none());
                let tensor = difference_and_scale_whole(&ad, &bd, keep).unwrap();
                let same = |x: f64, y: f64| {
                    (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-6 * y.abs()
                };
                let what = format!("case {i}, keep {}", keep.is_some());
                let finite = tensor.0.is_finite() && tensor.1.is_finite();
                if finite {
                    assert!(same(host.0, tensor.0) && same(host.1, tensor.1), "{what}");
                }
                assert_eq!(
                    max_relative_difference(a, b, keep).unwrap().is_finite(),
                    finite,
                    "{what}"
                );
                let (r, rd) = (
                    max_relative_difference(a, b, keep).unwrap(),
                    max_relative_difference(&ad, &bd, keep).unwrap(),
                );
                assert!(same(r, rd), "{what}: {r} vs {rd}");
            }
        }
        // Masked-out poison is not seen.
        let dropped = poisoned(&a, 2, f64::NAN);
        assert!(max_relative_difference(&dropped, &b, Some(&keep))
            .unwrap()
            .is_finite());
        assert!(!max_relative_difference(&dropped, &b, None)
            .unwrap()
            .is_finite());
    }
}
