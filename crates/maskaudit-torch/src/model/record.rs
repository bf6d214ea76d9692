//! What a model file is, and the record `maskaudit-export` leaves inside a TorchScript archive.
//!
//! libtorch says only "PytorchStreamReader failed" for anything that is not TorchScript, and a
//! directory or a FIFO is not even a file. People hand maskaudit what they have: a
//! `save_pretrained` directory, `.safetensors` weights, `torch.save(model)` or a state dict. Each
//! is recognised here by its first bytes (and, for zip archives, by its member names) so the
//! error can say what the file is and which command turns it into something maskaudit runs.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ModelError;

/// The archive member `maskaudit-export` writes (`_extra_files` of `torch.jit.save`, stored
/// under `<archive>/extra/`).
pub const RECORD_NAME: &str = "maskaudit.json";

/// How the exporter describes the module it traced. Only `forward_args` is required; the rest
/// is reported and checked where present (python/maskaudit/export.py documents every key).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ExportRecord {
    pub format_version: u32,
    /// The traced forward's tensors, in order: `input_ids`, `attention_mask`, `position_ids`,
    /// `labels`.
    pub forward_args: Vec<String>,
    #[serde(default)]
    pub output: Option<String>,
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub dtype: Option<String>,
    #[serde(default)]
    pub vocab_size: Option<i64>,
    #[serde(default)]
    pub max_position_embeddings: Option<i64>,
    /// The longest input the eager model itself accepts (learned positions), when it has one.
    #[serde(default)]
    pub length_limit: Option<i64>,
    #[serde(default)]
    pub trace_length: Option<i64>,
    /// The config's `sliding_window`, for a model whose attention has one.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// Sequence lengths at which the exporter compared the trace with the eager model.
    #[serde(default)]
    pub verified_lengths: Vec<i64>,
    #[serde(default)]
    pub max_relative_difference: Option<f64>,
    #[serde(default)]
    pub exporter: Option<String>,
    /// The device the trace was made on (`cpu`, `cuda`); absent in records of exporters that
    /// traced on the CPU only.
    #[serde(default)]
    pub device: Option<String>,
    /// The row layouts the trace was verified on: `padded`, `packed_position_ids` (a packed
    /// row's documents kept apart by position ids restarting at 0); absent in older records.
    #[serde(default)]
    pub layouts: Vec<String>,
    /// The attention the trace runs (`sdpa`, `eager`), and why SDPA was not used.
    #[serde(default)]
    pub attention: Option<String>,
    #[serde(default)]
    pub attention_fallback: Option<String>,
}

impl ExportRecord {
    /// The longest input the model accepts, as far as the record knows.
    pub fn position_limit(&self) -> Option<i64> {
        self.length_limit.or(self.max_position_embeddings)
    }

    /// The kind of device the trace was made on: `cpu` or `cuda`.
    pub fn trace_device(&self) -> &str {
        let device = self.device.as_deref().unwrap_or("cpu");
        device.split(':').next().unwrap_or(device)
    }

    /// The longest length the exporter checked the trace at.
    pub fn longest_verified(&self) -> Option<i64> {
        self.verified_lengths.iter().copied().max()
    }
}

/// The record format this build reads.
pub const RECORD_FORMAT: u32 = 1;

/// What a MODEL path turned out to be.
#[derive(Debug, Clone, PartialEq)]
pub enum FileKind {
    /// A TorchScript archive, with the exporter's record when it has one.
    TorchScript(Option<Box<ExportRecord>>),
    /// Anything else that might still be TorchScript to libtorch (it decides).
    Unknown,
}

/// Sorts out what `path` is, and turns everything that cannot be a TorchScript module into an
/// error that says what it is and what to run instead.
pub fn inspect(path: &Path) -> Result<FileKind, ModelError> {
    let display = path.display().to_string();
    let wrong = |what: &str, hint: &str| ModelError::WrongFile {
        path: display.clone(),
        what: what.to_string(),
        hint: hint.to_string(),
    };
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // A dangling link is there, yet has nothing behind it.
            return Err(match std::fs::symlink_metadata(path) {
                Ok(_) => wrong("a symbolic link to nothing", "point it at the model file"),
                Err(_) => ModelError::Missing { path: display },
            });
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(wrong(
                "a loop of symbolic links",
                "point MODEL at the model file itself",
            ))
        }
        Err(e) => {
            return Err(ModelError::Unreadable {
                path: display,
                message: e.to_string(),
            })
        }
    };
    if meta.is_dir() {
        return Err(if path.join("config.json").is_file() {
            wrong(
                "a Hugging Face model directory, not a TorchScript file",
                &export_hint(&display),
            )
        } else {
            wrong(
                "a directory, not a model file",
                "give the TorchScript file (model.pt) itself",
            )
        });
    }
    if !meta.is_file() {
        return Err(wrong(
            "not a regular file (a FIFO, socket or device)",
            "give the TorchScript file itself",
        ));
    }
    let mut head = [0u8; 16];
    let n = File::open(path)
        .and_then(|mut f| read_up_to(&mut f, &mut head))
        .map_err(|e| ModelError::Unreadable {
            path: display.clone(),
            message: e.to_string(),
        })?;
    let head = &head[..n];
    if head.starts_with(b"PK\x03\x04") {
        return zip_kind(path, &display);
    }
    if is_safetensors(head) {
        return Err(wrong(
            "safetensors weights, not a TorchScript module (weights alone have no code to run)",
            "export the model directory that holds them: `make export MODEL=<dir> OUT=model.pt`",
        ));
    }
    if head.starts_with(b"GGUF") {
        return Err(wrong(
            "a GGUF file, not a TorchScript module",
            "export the Hugging Face model directory instead: `make export MODEL=<dir> OUT=model.pt`",
        ));
    }
    if head.first() == Some(&0x80) && head.get(1).is_some_and(|&p| (2..=5).contains(&p)) {
        return Err(wrong(
            "a Python pickle (torch.save in the legacy format), not a TorchScript module",
            "load it in Python, save_pretrained it, then `make export MODEL=<dir> OUT=model.pt`",
        ));
    }
    Ok(FileKind::Unknown)
}

fn export_hint(dir: &str) -> String {
    format!("export it first: `make export MODEL={dir} OUT=model.pt`, then check model.pt")
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// safetensors: an 8-byte little-endian header length, then the JSON header.
fn is_safetensors(head: &[u8]) -> bool {
    head.len() >= 9 && head[8] == b'{' && {
        let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        len > 1 && len < (100 << 20)
    }
}

/// A zip archive: TorchScript has `code/`; `torch.save` has `data.pkl` and no code.
fn zip_kind(path: &Path, display: &str) -> Result<FileKind, ModelError> {
    let wrong = |what: &str, hint: &str| ModelError::WrongFile {
        path: display.to_string(),
        what: what.to_string(),
        hint: hint.to_string(),
    };
    let file = File::open(path).map_err(|e| ModelError::Unreadable {
        path: display.to_string(),
        message: e.to_string(),
    })?;
    let Ok(mut archive) = zip::ZipArchive::new(file) else {
        // A damaged archive: libtorch's own message says more.
        return Ok(FileKind::Unknown);
    };
    let names: Vec<String> = archive
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .collect();
    let member = |suffix: &str| names.iter().find(|n| n.ends_with(suffix)).cloned();
    let has_code = names.iter().any(|n| n.contains("/code/"));
    if !has_code {
        let Some(pickle) = member("/data.pkl") else {
            return Ok(FileKind::Unknown);
        };
        let mut head = Vec::new();
        if let Ok(entry) = archive.by_name(&pickle) {
            let _ = entry.take(256).read_to_end(&mut head);
        }
        return Err(if pickle_is_dict(&head) {
            wrong(
                "a state dict (weights only, torch.save(model.state_dict())): it has no code to run",
                "load the weights into the model class, save_pretrained it, then `make export MODEL=<dir> OUT=model.pt`",
            )
        } else {
            wrong(
                "a pickled model (torch.save(model)), not TorchScript",
                "save_pretrained the model in Python, then `make export MODEL=<dir> OUT=model.pt` (or torch.jit.trace it yourself)",
            )
        });
    }
    let Some(name) = member(&format!("/extra/{RECORD_NAME}")) else {
        return Ok(FileKind::TorchScript(None));
    };
    let mut text = String::new();
    archive
        .by_name(&name)
        .map_err(|e| e.to_string())
        .and_then(|e| {
            e.take(1 << 20)
                .read_to_string(&mut text)
                .map_err(|e| e.to_string())
        })
        .map_err(|message| ModelError::BadRecord {
            path: display.to_string(),
            message,
        })?;
    let record: ExportRecord = serde_json::from_str(&text).map_err(|e| ModelError::BadRecord {
        path: display.to_string(),
        message: e.to_string(),
    })?;
    if record.format_version != RECORD_FORMAT {
        return Err(ModelError::BadRecord {
            path: display.to_string(),
            message: format!(
                "format_version {} (this maskaudit reads {RECORD_FORMAT}); export the model again",
                record.format_version
            ),
        });
    }
    Ok(FileKind::TorchScript(Some(Box::new(record))))
}

/// Whether a pickle's first object is a dict (a state dict) rather than an instance of a class
/// (a module): protocol 2+ starts `\x80 N`, then `}` (EMPTY_DICT) or a GLOBAL of
/// `collections OrderedDict` for a dict.
fn pickle_is_dict(head: &[u8]) -> bool {
    let body = if head.first() == Some(&0x80) {
        &head[2.min(head.len())..]
    } else {
        head
    };
    body.first() == Some(&b'}') || body.starts_with(b"ccollections\nOrderedDict\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_and_pickles_are_told_apart() {
        let mut st = 120u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{\"w\":{}}");
        assert!(is_safetensors(&st));
        assert!(!is_safetensors(b"PK\x03\x04abcdefgh"));
        assert!(pickle_is_dict(b"\x80\x02}q\x00"));
        assert!(pickle_is_dict(b"\x80\x02ccollections\nOrderedDict\nq\x00"));
        assert!(!pickle_is_dict(
            b"\x80\x02ctransformers.models.llama\nLlamaForCausalLM\n"
        ));
    }

    #[test]
    fn a_record_parses_with_only_its_required_keys() {
        let r: ExportRecord =
            serde_json::from_str(r#"{"format_version":1,"forward_args":["input_ids"]}"#).unwrap();
        assert_eq!(r.forward_args, vec!["input_ids"]);
        assert_eq!(r.longest_verified(), None);
    }
}
