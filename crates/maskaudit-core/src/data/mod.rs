//! Reading pre-tokenized datasets, one row at a time.
//!
//! [`RowSource::open`] reads JSONL (`.jsonl`, or `-` for standard input), gzip-compressed
//! JSONL and Parquet, told apart by their first bytes rather than by the file name: `PAR1`
//! is Parquet, `1f 8b` is gzip, anything else is JSONL. Only the fields maskaudit needs are
//! decoded (other JSON keys are skipped unparsed, other Parquet columns are not read), and
//! every row is validated here by one function, [`validate`], whatever its format, so that
//! nothing malformed reaches libtorch or the lint checks. Errors name the file, the record
//! (`file:7` for line 7 of JSONL, `file:row 7` for the 7th Parquet row) and the field.

pub mod batch;
pub mod capture;
pub mod documents;
pub mod echo;
pub mod guard;
mod jsonl;
pub mod padding;
mod parquet_file;
pub mod rollout;
mod rollout_parquet;
mod row;
mod source;
pub mod token_losses;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

pub use jsonl::{parse_row, reader_from_bytes, JsonlReader, DEFAULT_MAX_LINE_BYTES};
pub use padding::{PaddingRule, PaddingSpan};
pub use parquet_file::ParquetReader;
pub use row::{validate, RawRow, Row};
pub use source::RowSource;

/// The Hugging Face ignore index: a label equal to it is not trained.
pub const IGNORE_INDEX: i64 = -100;

/// Fixed name of the per-row document lengths of a packed row (torchtune).
pub const SEQ_LENS_FIELD: &str = "seq_lens";
/// Fixed name of the per-row cumulative document boundaries of a packed row (flash-attention).
pub const CU_SEQLENS_FIELD: &str = "cu_seqlens";

/// Names of the fields a row is read from.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub input_ids: String,
    pub labels: String,
    pub loss_mask: String,
    pub attention_mask: String,
    pub position_ids: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        Self {
            input_ids: "input_ids".into(),
            labels: "labels".into(),
            loss_mask: "loss_mask".into(),
            attention_mask: "attention_mask".into(),
            position_ids: "position_ids".into(),
        }
    }
}

impl FieldNames {
    /// Every field a row may be built from, configurable names first.
    pub fn all(&self) -> [&str; 7] {
        [
            &self.input_ids,
            &self.labels,
            &self.loss_mask,
            &self.attention_mask,
            &self.position_ids,
            SEQ_LENS_FIELD,
            CU_SEQLENS_FIELD,
        ]
    }
}

/// Where a row's training mask came from, in order of precedence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MaskSource {
    /// The row's `loss_mask` (1 = trained).
    LossMask,
    /// `labels != -100`.
    Labels,
    /// The row's `attention_mask`: every real token is trained.
    AttentionMask,
    /// No mask field: every token of the row is trained.
    AllTokens,
}

impl MaskSource {
    pub fn as_str(self) -> &'static str {
        match self {
            MaskSource::LossMask => "loss_mask",
            MaskSource::Labels => "labels",
            MaskSource::AttentionMask => "attention_mask",
            MaskSource::AllTokens => "all_tokens",
        }
    }
}

impl fmt::Display for MaskSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a record number counts: lines of a JSONL file, rows of a Parquet file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    #[default]
    Line,
    Row,
}

/// A record's place in its file, as printed after `file:`: `7` (line 7) or `row 7`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub unit: Unit,
    /// 1-based.
    pub n: usize,
}

impl Pos {
    pub fn line(n: usize) -> Self {
        Pos {
            unit: Unit::Line,
            n,
        }
    }

    pub fn row(n: usize) -> Self {
        Pos { unit: Unit::Row, n }
    }

    /// `line 7` or `row 7`, for prose.
    pub fn named(self) -> String {
        match self.unit {
            Unit::Line => format!("line {}", self.n),
            Unit::Row => format!("row {}", self.n),
        }
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            Unit::Line => write!(f, "{}", self.n),
            Unit::Row => write!(f, "row {}", self.n),
        }
    }
}

/// The dataset formats maskaudit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Format {
    #[serde(rename = "jsonl")]
    Jsonl,
    #[serde(rename = "jsonl.gz")]
    JsonlGz,
    #[serde(rename = "parquet")]
    Parquet,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::JsonlGz => "jsonl.gz",
            Format::Parquet => "parquet",
        }
    }

    pub fn unit(self) -> Unit {
        match self {
            Format::Parquet => Unit::Row,
            Format::Jsonl | Format::JsonlGz => Unit::Line,
        }
    }
}

/// Bad input: always reported as `file:record: field: message`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    #[error("{path}:{at}: {source}")]
    Read {
        path: String,
        at: Pos,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{at}: {message}")]
    Record {
        path: String,
        at: Pos,
        message: String,
    },
    #[error("{path}:{at}: {field}: {message}")]
    Field {
        path: String,
        at: Pos,
        field: String,
        message: String,
    },
    #[error("{path}: no rows: the dataset is empty")]
    Empty { path: String },
}

/// A path for messages: `-` stays `-`.
pub fn display_path(p: &Path) -> String {
    if p == Path::new("-") {
        "-".into()
    } else {
        PathBuf::from(p).display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(ids: &[i64]) -> RawRow {
        RawRow {
            input_ids: Some(ids.to_vec()),
            ..RawRow::default()
        }
    }

    fn check(raw: RawRow) -> Result<Row, String> {
        validate(raw, "d.parquet", Pos::row(3), &FieldNames::default()).map_err(|e| e.to_string())
    }

    #[test]
    fn positions_print_as_lines_or_rows() {
        assert_eq!(Pos::line(7).to_string(), "7");
        assert_eq!(Pos::row(7).to_string(), "row 7");
        assert_eq!(Pos::row(7).named(), "row 7");
        assert_eq!(Pos::line(7).named(), "line 7");
    }

    #[test]
    fn packing_fields_are_validated() {
        let mut r = raw(&[1, 2, 3, 4]);
        r.position_ids = Some(vec![0, 1, 0, 1]);
        r.seq_lens = Some(vec![2, 2]);
        r.cu_seqlens = Some(vec![0, 2, 4]);
        let row = check(r).unwrap();
        assert_eq!(row.seq_lens, Some(vec![2, 2]));
        assert!(!row.attention_mask_given);
        assert_eq!(row.loss_mask(), None);

        let mut r = raw(&[1, 2, 3]);
        r.position_ids = Some(vec![0, 1]);
        assert_eq!(
            check(r).unwrap_err(),
            "d.parquet:row 3: position_ids: has 2 entries but input_ids has 3"
        );
        let mut r = raw(&[1, 2, 3]);
        r.seq_lens = Some(vec![2, 2]);
        assert_eq!(
            check(r).unwrap_err(),
            "d.parquet:row 3: seq_lens: the lengths sum to 4 but input_ids has 3 tokens"
        );
        let mut r = raw(&[1, 2, 3]);
        r.cu_seqlens = Some(vec![0, 2, 1]);
        assert!(check(r)
            .unwrap_err()
            .starts_with("d.parquet:row 3: cu_seqlens: boundary 1 at index 2"));
        let mut r = raw(&[1, 2, 3]);
        r.position_ids = Some(vec![0, -1, 2]);
        assert!(check(r).unwrap_err().contains("negative position -1"));
    }

    #[test]
    fn given_masks_are_remembered() {
        let mut r = raw(&[1, 2, 3]);
        r.attention_mask = Some(vec![1, 1, 0]);
        r.loss_mask = Some(vec![0, 1, 0]);
        let row = check(r).unwrap();
        assert_eq!(row.given_attention_mask(), Some(&[1u8, 1, 0][..]));
        assert_eq!(row.loss_mask(), Some(&[0u8, 1, 0][..]));
    }
}
