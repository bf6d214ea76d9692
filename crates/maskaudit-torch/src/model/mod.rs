//! The model interface, and the one implementation: a TorchScript module through tch.
//!
//! Everything that touches libtorch for the model lives here, so that another format
//! (torch.export / AOTInductor) can be added behind [`LanguageModel`] later.

use std::path::{Path, PathBuf};

use tch::{Device, Tensor};

/// A causal language model: token ids in, next-token logits out.
pub trait LanguageModel {
    fn vocab_size(&self) -> i64;
    fn device(&self) -> Device;
    /// Logits `[B, T, V]` for `input_ids` `[B, T]`; `attention_mask` is 1 for tokens, 0 for padding.
    fn logits(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError>;
    /// [`Self::logits`] with each row's own position ids `[B, T]` (a packed row's restart at
    /// each document). A forward that takes none ignores them: the default.
    fn logits_at(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        position_ids: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let _ = position_ids;
        self.logits(input_ids, attention_mask)
    }
    /// Whether a packed row's documents stay apart in the forward: it takes position ids and
    /// its record says it supports packed rows (`packed_position_ids`). Otherwise `check`
    /// splits packed rows into their documents.
    fn keeps_documents_apart(&self) -> bool {
        false
    }
}

/// A model file loaded for `check`: the forward, and what the report says of it. One
/// implementation a model format ([`TorchScriptLm`] today); [`load`] picks it. `Sync`: `check`
/// calls the forward from two threads at once (the consistency probe beside the batches).
pub trait LoadedModel: LanguageModel + Sync {
    /// The file, for messages and the report.
    fn path(&self) -> &str;
    /// The forward's arguments, and how they were found.
    fn signature(&self) -> &Signature;
    /// Where the logits are in the forward's output.
    fn output_form(&self) -> OutputForm;
    /// The parameters' dtype (`float32`, `bfloat16`, …), as recorded or as found.
    fn dtype(&self) -> &str;
    /// The dtype the forward runs in (`--dtype`, else the model's own).
    fn run_kind(&self) -> tch::Kind;
    /// [`Self::run_kind`] by PyTorch's name: `float32`, `bfloat16`, `float16`.
    fn run_dtype(&self) -> &'static str {
        kind_name(self.run_kind())
    }
    /// The maskaudit-export record, when the file has one.
    fn record(&self) -> Option<&record::ExportRecord>;
    /// The TorchScript module behind the model, for `--loss-method` (a method of the model's
    /// own module); `None` for a format that has no methods to call.
    fn torchscript(&self) -> Option<&tch::CModule>;
}

/// Loads a model file, in whatever format it is: today TorchScript, the only one (a file of
/// another kind is named for what it is by [`TorchScriptLm::load`]). A new format is told apart
/// here, by its contents, and returns its own [`LoadedModel`].
pub fn load(
    path: &Path,
    device: Device,
    opts: &LoadOptions,
) -> Result<Box<dyn LoadedModel>, ModelError> {
    Ok(Box::new(TorchScriptLm::load(path, device, opts)?))
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: no such file")]
    Missing { path: String },
    #[error("{path}: {what}; {hint}")]
    WrongFile {
        path: String,
        what: String,
        hint: String,
    },
    #[error("{path}: cannot be read: {message}")]
    Unreadable { path: String, message: String },
    #[error(
        "{path}: the maskaudit-export record ({}) is unreadable: {message}",
        record::RECORD_NAME
    )]
    BadRecord { path: String, message: String },
    #[error("{path}: {message}")]
    ForwardArgs { path: String, message: String },
    #[error("{path}: converting the model to {dtype} (--dtype) failed: {message}")]
    Convert {
        path: String,
        dtype: String,
        message: String,
    },
    #[error("{path}: the batch starting at {at} needs {need} for its logits {shape} but {available} is available; lower --batch-size")]
    Memory {
        path: String,
        at: String,
        need: String,
        shape: String,
        available: String,
    },
    #[error("{path}: not a TorchScript module: {message}")]
    NotTorchScript { path: String, message: String },
    #[error("{path}: the forward failed on a two-token probe input: {tried}")]
    Signature { path: String, tried: String },
    #[error("{path}: unsupported output: {found}; expected logits [batch, positions, vocabulary] as a tensor, the first element of a tuple or list, or a dict's \"logits\" entry")]
    Output { path: String, found: String },
    #[error("{path}: forward failed on the batch starting at line {line}: {message}")]
    Forward {
        path: String,
        line: usize,
        message: String,
    },
    #[error(
        "{path}: the model returned NaN or infinite logits for the batch starting at line {line}"
    )]
    NonFinite { path: String, line: usize },
    #[error("--device {device}: {message}")]
    Device { device: String, message: String },
    #[error("libtorch: {0}")]
    Torch(String),
}

impl ModelError {
    /// A libtorch error in the work on the batch starting at `line`, with the file and line.
    pub fn in_batch(path: &str, line: usize, e: &tch::TchError) -> Self {
        ModelError::Forward {
            path: path.to_string(),
            line,
            message: torch_message(&e.to_string()),
        }
    }

    /// A forward's error, placed at its batch: libtorch's own gain the file and line.
    pub fn at_batch(self, path: &str, line: usize) -> Self {
        match self {
            ModelError::Torch(message) => ModelError::Forward {
                path: path.to_string(),
                line,
                message,
            },
            other => other,
        }
    }
}

impl From<tch::TchError> for ModelError {
    fn from(e: tch::TchError) -> Self {
        ModelError::Torch(torch_message(&e.to_string()))
    }
}

pub mod consistency;
mod cuda_event;
mod device;
mod precision;
pub mod record;
mod torchscript;

// The forward's types are the report's too (`maskaudit_core::model`).
pub use maskaudit_core::model::{ArgsSource, ForwardArg, OutputForm, Signature};

pub use cuda_event::CudaEvent;
pub use device::*;
pub use precision::*;
pub use torchscript::*;

/// Process-wide libtorch settings for a pass over a dataset; call before anything else touches
/// libtorch (`maskaudit check` does, first thing).
///
/// - The JIT's profiling executor is turned off: otherwise it re-profiles and re-optimises the
///   graph for every new sequence length.
///
/// The environment libtorch reads at its first allocation is the caller's: `maskaudit check`
/// sets `THP_MEM_ALLOC_ENABLE=1` unless it is given (src/settings.rs), so that libtorch backs
/// its CPU allocations of 2 MiB and more with transparent huge pages. Every batch allocates
/// its logits afresh (hundreds of MiB), and the kernel faults fresh memory in a 4 KiB page at
/// a time, a large share of the CPU time on the compute-bound benchmark (docs/performance.md,
/// "Figures behind the code"). Where THP is off, nothing changes.
pub fn configure_libtorch() {
    tch::jit::set_profiling_mode(false);
}

/// A fresh copy of a tensor, storage of its own (`Tensor::copy` panics on error): what a
/// forward or a user's loss is handed, so that one writing into its inputs cannot change
/// maskaudit's.
pub fn fresh_copy(t: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut out = t.f_empty_like()?;
    out.f_copy_(t)?;
    Ok(out)
}

/// The elements of a contiguous f32 CPU tensor, borrowed; `None` for any other tensor.
///
/// # Safety
///
/// A `Tensor` is a handle on shared storage: another handle (a shallow clone, a view, a
/// TorchScript module holding it) can write the same memory through `&self`. The caller
/// must make sure nothing writes `t`'s storage, and that it is not resized or freed, while
/// the returned slice lives.
pub unsafe fn host_f32(t: &Tensor) -> Option<&[f32]> {
    if t.device() != Device::Cpu || t.kind() != tch::Kind::Float || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        // An empty tensor's data pointer may be null: from_raw_parts needs a non-null one.
        return Some(&[]);
    }
    let data = t.data_ptr() as *const f32;
    if data.is_null() {
        return None;
    }
    // SAFETY: a contiguous, non-empty f32 host tensor of `n` elements starting at `data`
    // (the storage offset included); the slice borrows `t`, and the caller guarantees no
    // writer meanwhile.
    Some(unsafe { std::slice::from_raw_parts(data, n) })
}

/// libtorch errors carry C++ backtraces over many lines; keep the line that says what happened.
pub fn torch_message(raw: &str) -> String {
    let raw = raw.split("Exception raised from").next().unwrap_or(raw);
    let lines: Vec<&str> = raw
        .lines()
        .map(|l| l.trim().trim_start_matches("Internal torch error: "))
        .filter(|l| !l.is_empty() && !l.starts_with("frame #"))
        .collect();
    // TorchScript prints a traceback, then the exception on the last line.
    let is_exception = |l: &&&str| {
        let head = l.split(':').next().unwrap_or("");
        !head.contains(' ') && (head.ends_with("Error") || head.ends_with("Exception"))
    };
    let pick = lines
        .iter()
        .rev()
        .find(is_exception)
        .or(lines.first())
        .copied()
        .unwrap_or("unknown libtorch error");
    let pick = pick.strip_prefix("builtins.").unwrap_or(pick);
    // The zip reader's message goes on about checkpoints; its first sentence is the point.
    let pick = match pick.find(". ") {
        Some(i) if pick.len() > 200 => &pick[..=i],
        _ => pick,
    };
    let mut s: String = pick.chars().take(300).collect();
    if pick.chars().count() > 300 {
        s.push('…');
    }
    s
}

/// For displaying a model path in messages and reports.
pub fn path_string(p: &Path) -> String {
    PathBuf::from(p).display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torch_message_keeps_the_meaningful_line() {
        let raw = "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript (most recent call last):\n  File \"x.py\", line 3\nbuiltins.RuntimeError: boom happened\n";
        assert_eq!(torch_message(raw), "RuntimeError: boom happened");
        assert_eq!(
            torch_message("Internal torch error: forward() is missing value for argument 'labels'. Declaration: forward(Tensor a) -> Tensor\nException raised from x at y.h:61\nframe #0: c10::Error::Error(c10::SourceLocation)"),
            "forward() is missing value for argument 'labels'. Declaration: forward(Tensor a) -> Tensor"
        );
    }
}
