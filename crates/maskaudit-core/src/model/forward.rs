//! What a model's forward takes and returns, as the report names it: pure types, shared by the
//! loader (`maskaudit_torch::model`) and the report.

use std::fmt;

use serde::Serialize;

/// Where the logits were found in the module's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputForm {
    Tensor,
    TupleFirst,
    /// `(loss, logits, …)`: what a Hugging Face model returns when given labels.
    LossThenLogits,
    DictLogits,
}

impl fmt::Display for OutputForm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputForm::Tensor => "a tensor",
            OutputForm::TupleFirst => "the first element of a tuple",
            OutputForm::LossThenLogits => "the second element of a (loss, logits) tuple",
            OutputForm::DictLogits => "the \"logits\" entry of a dict",
        })
    }
}

/// A tensor the model's forward can take, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardArg {
    InputIds,
    /// 1 for tokens, 0 for padding.
    AttentionMask,
    /// 0, 1, … along each row.
    PositionIds,
    /// The ids, −100 where the attention mask is 0 (the model's own loss is not used).
    Labels,
}

impl ForwardArg {
    pub const ALL: [ForwardArg; 4] = [
        ForwardArg::InputIds,
        ForwardArg::AttentionMask,
        ForwardArg::PositionIds,
        ForwardArg::Labels,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ForwardArg::InputIds => "input_ids",
            ForwardArg::AttentionMask => "attention_mask",
            ForwardArg::PositionIds => "position_ids",
            ForwardArg::Labels => "labels",
        }
    }
}

impl fmt::Display for ForwardArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ForwardArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        crate::by_name(&ForwardArg::ALL, ForwardArg::name, s.trim())
            .map_err(|known| format!("unknown forward argument '{s}' (known: {known})"))
    }
}

/// How the forward's arguments were established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArgsSource {
    /// The maskaudit-export record inside the file.
    Record,
    /// `--forward-args`.
    Option,
    /// `--loss-method forward` with `--loss-args`: the forward is the loss, and its logits are
    /// read from the same call.
    LossArgs,
    /// Calls with probe inputs, see `maskaudit_torch::model`.
    Probe,
}

/// The forward's arguments, in order, and how maskaudit knows them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Signature {
    pub args: Vec<ForwardArg>,
    pub source: ArgsSource,
    /// How they were concluded, in words.
    pub note: String,
}

impl Signature {
    /// `input_ids_attention_mask`, `input_ids`, …: the JSON's `signature`.
    pub fn key(&self) -> String {
        let names: Vec<&str> = self.args.iter().map(|a| a.name()).collect();
        names.join("_")
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.args.iter().map(|a| a.name()).collect();
        write!(f, "forward({})", names.join(", "))
    }
}
