//! The TorchScript implementation of [`super::LanguageModel`].

use std::fmt;
use std::path::Path;

use serde::Serialize;
use tch::{CModule, Device, IValue, Tensor};

use super::{torch_message, LanguageModel, ModelError};

/// Which arguments the module's forward takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signature {
    InputIdsAttentionMask,
    InputIds,
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Signature::InputIdsAttentionMask => "forward(input_ids, attention_mask)",
            Signature::InputIds => "forward(input_ids)",
        })
    }
}

/// Where the logits were found in the module's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputForm {
    Tensor,
    TupleFirst,
    DictLogits,
}

impl fmt::Display for OutputForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputForm::Tensor => "a tensor",
            OutputForm::TupleFirst => "the first element of a tuple",
            OutputForm::DictLogits => "the \"logits\" entry of a dict",
        })
    }
}

/// A TorchScript causal LM.
pub struct TorchScriptLm {
    module: CModule,
    path: String,
    device: Device,
    vocab_size: i64,
    signature: Signature,
    output_form: OutputForm,
}

/// Loads a TorchScript file in eval mode, with errors that name the file.
pub fn load_module(path: &Path, device: Device) -> Result<CModule, ModelError> {
    let display = path.display().to_string();
    if !path.is_file() {
        return Err(ModelError::Missing { path: display });
    }
    let mut module =
        CModule::load_on_device(path, device).map_err(|e| ModelError::NotTorchScript {
            path: display,
            message: torch_message(&e.to_string()),
        })?;
    module.set_eval();
    Ok(module)
}

impl TorchScriptLm {
    /// Loads the module and probes it once with a two-token input to learn its signature,
    /// output form and vocabulary size.
    pub fn load(path: &Path, device: Device) -> Result<Self, ModelError> {
        let display = path.display().to_string();
        let module = load_module(path, device)?;

        let ids = Tensor::f_from_slice(&[0i64, 0])?
            .f_view([1, 2])?
            .f_to_device(device)?;
        let mask = ids.f_ones_like()?;
        // A forward(input_ids, labels=None) model accepts two tensors too, and then returns a
        // loss first: an output that is not logits means "try the next signature".
        let mut tried = vec![];
        let mut bad_output = None;
        for signature in [Signature::InputIdsAttentionMask, Signature::InputIds] {
            let out = match call(&module, signature, &ids, &mask) {
                Ok(out) => out,
                Err(e) => {
                    tried.push(format!("{signature}: {}", torch_message(&e.to_string())));
                    continue;
                }
            };
            let found = match extract_logits(out) {
                Ok((logits, output_form)) => {
                    let size = logits.size();
                    if size.len() == 3 && size[..2] == [1, 2] && logits.is_floating_point() {
                        return Ok(Self {
                            module,
                            path: display,
                            device,
                            vocab_size: size[2],
                            signature,
                            output_form,
                        });
                    }
                    format!(
                        "a {:?} tensor of shape {size:?} for input_ids of shape [1, 2]",
                        logits.kind()
                    )
                }
                Err(found) => found,
            };
            tried.push(format!("{signature}: returned {found}"));
            bad_output.get_or_insert(found);
        }
        Err(match bad_output {
            Some(found) => ModelError::Output {
                path: display,
                found,
            },
            None => ModelError::Signature {
                path: display,
                tried: tried.join("; "),
            },
        })
    }

    pub fn signature(&self) -> Signature {
        self.signature
    }

    pub fn output_form(&self) -> OutputForm {
        self.output_form
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The underlying module, for methods other than forward (a user's loss method).
    pub fn module(&self) -> &CModule {
        &self.module
    }
}

fn call(
    module: &CModule,
    signature: Signature,
    ids: &Tensor,
    mask: &Tensor,
) -> Result<IValue, tch::TchError> {
    match signature {
        Signature::InputIdsAttentionMask => module.forward_is(&[
            IValue::Tensor(ids.shallow_clone()),
            IValue::Tensor(mask.shallow_clone()),
        ]),
        Signature::InputIds => module.forward_is(&[IValue::Tensor(ids.shallow_clone())]),
    }
}

/// Finds the logits tensor in a module's output, or says what came back instead.
pub fn extract_logits(out: IValue) -> Result<(Tensor, OutputForm), String> {
    match out {
        IValue::Tensor(t) => Ok((t, OutputForm::Tensor)),
        IValue::Tuple(items) | IValue::GenericList(items) => match items.into_iter().next() {
            Some(IValue::Tensor(t)) => Ok((t, OutputForm::TupleFirst)),
            Some(other) => Err(format!(
                "a tuple whose first element is {}",
                describe(&other)
            )),
            None => Err("an empty tuple".into()),
        },
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

impl LanguageModel for TorchScriptLm {
    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }

    fn device(&self) -> Device {
        self.device
    }

    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let out = call(&self.module, self.signature, input_ids, attention_mask)?;
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
