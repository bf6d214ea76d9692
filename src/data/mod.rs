//! Reading pre-tokenized datasets, one row at a time.
//!
//! [`RowSource::open`] reads JSONL (`.jsonl`, or `-` for standard input), gzip-compressed
//! JSONL and Parquet, told apart by their first bytes rather than by the file name: `PAR1`
//! is Parquet, `1f 8b` is gzip, anything else is JSONL. Only the fields maskaudit needs are
//! decoded (other JSON keys are skipped unparsed, other Parquet columns are not read), and
//! every row is validated here by one function, [`validate`], whatever its format, so that
//! nothing malformed reaches libtorch or the lint checks. Errors name the file, the record
//! (`file:7` for line 7 of JSONL, `file:row 7` for the 7th Parquet row) and the field.

pub mod echo;
mod guard;
mod jsonl;
mod parquet_file;

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

pub use jsonl::{parse_row, reader_from_bytes, JsonlReader, DEFAULT_MAX_LINE_BYTES};
pub use parquet_file::ParquetReader;

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

/// One validated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based record number: the line in JSONL (blank lines counted), the row in Parquet.
    pub line: usize,
    pub input_ids: Vec<i64>,
    /// Aligned with `input_ids`: 1 where the token is a training target.
    pub mask: Vec<u8>,
    /// Aligned with `input_ids`: 1 for real tokens, 0 for padding already in the file; all
    /// ones when the row has no attention mask (see [`Row::given_attention_mask`]).
    pub attention_mask: Vec<u8>,
    pub mask_source: MaskSource,
    /// Whether `attention_mask` was in the row rather than made up.
    pub attention_mask_given: bool,
    /// The labels as given (−100 = not trained), aligned with `input_ids`.
    pub labels: Option<Vec<i64>>,
    /// As given, aligned with `input_ids`; 0 where a packed row's document starts.
    pub position_ids: Option<Vec<i64>>,
    /// Lengths of the documents packed into the row, as given (they sum to at most its length).
    pub seq_lens: Option<Vec<i64>>,
    /// Cumulative document boundaries of a packed row, as given (non-decreasing, within it).
    pub cu_seqlens: Option<Vec<i64>>,
}

impl Row {
    /// A row with nothing but token ids: every token is trained.
    pub fn new(line: usize, input_ids: Vec<i64>) -> Self {
        let len = input_ids.len();
        Row {
            line,
            input_ids,
            mask: vec![1; len],
            attention_mask: vec![1; len],
            mask_source: MaskSource::AllTokens,
            attention_mask_given: false,
            labels: None,
            position_ids: None,
            seq_lens: None,
            cu_seqlens: None,
        }
    }

    /// The row's `loss_mask`, when it had one.
    pub fn loss_mask(&self) -> Option<&[u8]> {
        (self.mask_source == MaskSource::LossMask).then_some(&self.mask[..])
    }

    /// The row's `attention_mask`, when it had one.
    pub fn given_attention_mask(&self) -> Option<&[u8]> {
        self.attention_mask_given
            .then_some(&self.attention_mask[..])
    }
}

/// A row's fields as read, before validation. `None` = absent or null.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRow {
    pub input_ids: Option<Vec<i64>>,
    pub labels: Option<Vec<i64>>,
    pub loss_mask: Option<Vec<i64>>,
    pub attention_mask: Option<Vec<i64>>,
    pub position_ids: Option<Vec<i64>>,
    pub seq_lens: Option<Vec<i64>>,
    pub cu_seqlens: Option<Vec<i64>>,
}

impl RawRow {
    /// The slot for a field name, if the name is one of ours. A name configured for two
    /// fields fills the first.
    pub fn slot(&mut self, fields: &FieldNames, name: &str) -> Option<&mut Option<Vec<i64>>> {
        if name == fields.input_ids {
            Some(&mut self.input_ids)
        } else if name == fields.labels {
            Some(&mut self.labels)
        } else if name == fields.loss_mask {
            Some(&mut self.loss_mask)
        } else if name == fields.attention_mask {
            Some(&mut self.attention_mask)
        } else if name == fields.position_ids {
            Some(&mut self.position_ids)
        } else if name == SEQ_LENS_FIELD {
            Some(&mut self.seq_lens)
        } else if name == CU_SEQLENS_FIELD {
            Some(&mut self.cu_seqlens)
        } else {
            None
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

/// Validates the fields of one record and builds its [`Row`].
pub fn validate(raw: RawRow, path: &str, at: Pos, fields: &FieldNames) -> Result<Row, DataError> {
    let field_err = |field: &str, message: String| DataError::Field {
        path: path.to_string(),
        at,
        field: field.to_string(),
        message,
    };
    let input_ids = raw
        .input_ids
        .ok_or_else(|| field_err(&fields.input_ids, "missing (required)".into()))?;
    if input_ids.is_empty() {
        return Err(field_err(
            &fields.input_ids,
            "empty: a row needs at least one token".into(),
        ));
    }
    if let Some((i, id)) = input_ids.iter().enumerate().find(|(_, id)| **id < 0) {
        return Err(field_err(
            &fields.input_ids,
            format!("negative token id {id} at index {i}"),
        ));
    }
    let len = input_ids.len();
    let check_len = |name: &str, n: usize| -> Result<(), DataError> {
        if n != len {
            return Err(field_err(
                name,
                format!("has {n} entries but {} has {len}", fields.input_ids),
            ));
        }
        Ok(())
    };
    let binary = |name: &str, values: Vec<i64>| -> Result<Vec<u8>, DataError> {
        check_len(name, values.len())?;
        values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                0 | 1 => Ok(*v as u8),
                _ => Err(field_err(
                    name,
                    format!("value {v} at index {i}: expected 0 or 1"),
                )),
            })
            .collect()
    };

    let loss_mask = raw
        .loss_mask
        .map(|v| binary(&fields.loss_mask, v))
        .transpose()?;
    let attention_mask = raw
        .attention_mask
        .map(|v| binary(&fields.attention_mask, v))
        .transpose()?;
    let labels = raw.labels;
    if let Some(labels) = &labels {
        check_len(&fields.labels, labels.len())?;
    }
    if let Some(position_ids) = &raw.position_ids {
        check_len(&fields.position_ids, position_ids.len())?;
        if let Some((i, p)) = position_ids.iter().enumerate().find(|(_, p)| **p < 0) {
            return Err(field_err(
                &fields.position_ids,
                format!("negative position {p} at index {i}"),
            ));
        }
    }
    if let Some(seq_lens) = &raw.seq_lens {
        if let Some((i, n)) = seq_lens.iter().enumerate().find(|(_, n)| **n < 0) {
            return Err(field_err(
                SEQ_LENS_FIELD,
                format!("negative length {n} at index {i}"),
            ));
        }
        let total: i64 = seq_lens.iter().fold(0i64, |a, &n| a.saturating_add(n));
        if total > len as i64 {
            return Err(field_err(
                SEQ_LENS_FIELD,
                format!(
                    "the lengths sum to {total} but {} has {len} tokens",
                    fields.input_ids
                ),
            ));
        }
    }
    if let Some(cu) = &raw.cu_seqlens {
        let mut previous = 0i64;
        for (i, &b) in cu.iter().enumerate() {
            if b < previous || b > len as i64 {
                return Err(field_err(
                    CU_SEQLENS_FIELD,
                    format!(
                        "boundary {b} at index {i}: expected non-decreasing offsets within 0..={len}"
                    ),
                ));
            }
            previous = b;
        }
    }

    let (mask, mask_source) = if let Some(mask) = loss_mask {
        (mask, MaskSource::LossMask)
    } else if let Some(labels) = &labels {
        let mask = labels
            .iter()
            .map(|&l| u8::from(l != IGNORE_INDEX))
            .collect();
        (mask, MaskSource::Labels)
    } else if let Some(mask) = &attention_mask {
        (mask.clone(), MaskSource::AttentionMask)
    } else {
        (vec![1; len], MaskSource::AllTokens)
    };
    let attention_mask_given = attention_mask.is_some();
    let attention_mask = attention_mask.unwrap_or_else(|| vec![1; len]);

    Ok(Row {
        line: at.n,
        input_ids,
        mask,
        attention_mask,
        mask_source,
        attention_mask_given,
        labels,
        position_ids: raw.position_ids,
        seq_lens: raw.seq_lens,
        cu_seqlens: raw.cu_seqlens,
    })
}

/// A path for messages: `-` stays `-`.
pub fn display_path(p: &Path) -> String {
    if p == Path::new("-") {
        "-".into()
    } else {
        PathBuf::from(p).display().to_string()
    }
}

/// Counts the bytes read through it, so progress can follow a compressed file.
struct CountingReader<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// A directory, or a named pipe (FIFO): opening a FIFO waits, without end, for a writer.
/// The pipe of a process substitution (`<(zcat d.gz)`, a `/dev/fd/N` link to `pipe:[…]`)
/// has its writer already and is read like a file.
fn refuse_special_files(path: &Path, display: &str) -> Result<(), DataError> {
    // A path that cannot be inspected is left to File::open, which says why.
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    let refuse = |message: &str| {
        Err(DataError::Format {
            path: display.to_string(),
            message: message.to_string(),
        })
    };
    if metadata.is_dir() {
        return refuse("is a directory: DATA is a JSONL, .jsonl.gz or Parquet file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if metadata.file_type().is_fifo() && !is_anonymous_pipe(path) {
            return refuse(
                "is a named pipe (FIFO), which would block until a writer opens it: pipe it into standard input instead (`maskaudit ... - < FIFO`)",
            );
        }
    }
    Ok(())
}

/// Whether `path` is, through its symbolic links, a `pipe:[…]` of /proc/PID/fd.
fn is_anonymous_pipe(path: &Path) -> bool {
    let mut current = path.to_path_buf();
    // A few hops: /dev/stdin -> /proc/self/fd/0 -> pipe:[123].
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&current) else {
            return false;
        };
        if target.to_string_lossy().starts_with("pipe:[") {
            return true;
        }
        current = match current.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    false
}

/// Buffer of the file and of the decompressor. Small under the fuzzer (`cfg(fuzzing)`, set by
/// cargo-fuzz): a megabyte allocated for each input slowed it a hundredfold, and small buffers
/// put line ends across buffer boundaries more often.
const READ_BUFFER_BYTES: usize = if cfg!(fuzzing) { 64 } else { 1 << 20 };

const PARQUET_MAGIC: &[u8] = b"PAR1";
const GZIP_MAGIC: &[u8] = &[0x1f, 0x8b];

/// Rows of a dataset, whatever its format: JSONL, gzip-compressed JSONL or Parquet.
pub struct RowSource {
    path: String,
    format: Format,
    inner: Inner,
    /// Bytes of the file consumed, when counted below the decompressor.
    compressed_bytes: Option<Arc<AtomicU64>>,
}

enum Inner {
    Jsonl(JsonlReader),
    Parquet(ParquetReader),
}

impl RowSource {
    /// Opens `path` (`-` is standard input: JSONL, plain or gzip-compressed).
    pub fn open(path: &Path, fields: FieldNames) -> Result<Self, DataError> {
        let display = display_path(path);
        let open_err = |source: io::Error| DataError::Open {
            path: display.clone(),
            source,
        };
        if display == "-" {
            return Self::from_stream(&display, io::stdin(), fields);
        }

        refuse_special_files(path, &display)?;
        let file = File::open(path).map_err(open_err)?;
        let metadata = file.metadata().map_err(open_err)?;
        let total = metadata.len();
        let count = Arc::new(AtomicU64::new(0));
        let mut reader = BufReader::with_capacity(
            READ_BUFFER_BYTES,
            CountingReader {
                inner: file,
                count: count.clone(),
            },
        );
        let head = reader.fill_buf().map_err(open_err)?;
        if head.starts_with(PARQUET_MAGIC) {
            drop(reader);
            let parquet = ParquetReader::open(path, display.clone(), fields)?;
            return Ok(RowSource {
                path: display,
                format: Format::Parquet,
                inner: Inner::Parquet(parquet),
                compressed_bytes: None,
            });
        }
        if head.starts_with(GZIP_MAGIC) {
            let decoder = flate2::read::MultiGzDecoder::new(reader);
            let jsonl = JsonlReader::from_reader(
                display.clone(),
                Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)),
                Some(total),
                fields,
            );
            return Ok(Self::jsonl(display, Format::JsonlGz, jsonl, Some(count)));
        }
        let jsonl =
            JsonlReader::from_reader(display.clone(), Box::new(reader), Some(total), fields);
        Ok(Self::jsonl(display, Format::Jsonl, jsonl, None))
    }

    /// Rows of a stream that cannot seek (standard input): JSONL, plain or gzip-compressed.
    pub fn from_stream(
        name: &str,
        stream: impl Read + Send + 'static,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let display = name.to_string();
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let head = reader.fill_buf().map_err(|source| DataError::Open {
            path: display.clone(),
            source,
        })?;
        if head.starts_with(GZIP_MAGIC) {
            let decoder = flate2::read::MultiGzDecoder::new(reader);
            let jsonl = JsonlReader::from_reader(
                display.clone(),
                Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, decoder)),
                None,
                fields,
            );
            return Ok(Self::jsonl(display, Format::JsonlGz, jsonl, None));
        }
        if head.starts_with(PARQUET_MAGIC) {
            return Err(DataError::Format {
                path: display,
                message: "Parquet cannot be read from standard input: pass the file's path".into(),
            });
        }
        let jsonl = JsonlReader::from_reader(display.clone(), Box::new(reader), None, fields);
        Ok(Self::jsonl(display, Format::Jsonl, jsonl, None))
    }

    /// Rows of a Parquet file held in memory (the fuzzer's way in).
    pub fn from_parquet_bytes(
        name: &str,
        bytes: Vec<u8>,
        fields: FieldNames,
    ) -> Result<Self, DataError> {
        let parquet = ParquetReader::from_bytes(name.to_string(), bytes, fields)?;
        Ok(RowSource {
            path: name.to_string(),
            format: Format::Parquet,
            inner: Inner::Parquet(parquet),
            compressed_bytes: None,
        })
    }

    /// Lines of JSONL longer than this are an error ([`DEFAULT_MAX_LINE_BYTES`] unless set);
    /// Parquet has no lines.
    pub fn with_max_line_bytes(mut self, max: usize) -> Self {
        if let Inner::Jsonl(r) = &mut self.inner {
            r.set_max_line_bytes(max);
        }
        self
    }

    /// JSONL rows from memory (tests, and callers that already hold the bytes).
    pub fn from_jsonl_bytes(name: &str, bytes: Vec<u8>, fields: FieldNames) -> Self {
        let reader = reader_from_bytes(name, bytes, fields);
        Self::jsonl(name.to_string(), Format::Jsonl, reader, None)
    }

    fn jsonl(
        path: String,
        format: Format,
        reader: JsonlReader,
        compressed_bytes: Option<Arc<AtomicU64>>,
    ) -> Self {
        RowSource {
            path,
            format,
            inner: Inner::Jsonl(reader),
            compressed_bytes,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// What the record numbers of this source count.
    pub fn unit(&self) -> Unit {
        self.format.unit()
    }

    /// Bytes of the input consumed so far (estimated from rows for Parquet), for progress.
    pub fn bytes_read(&self) -> u64 {
        if let Some(count) = &self.compressed_bytes {
            return count.load(Ordering::Relaxed);
        }
        match &self.inner {
            Inner::Jsonl(r) => r.bytes_read(),
            Inner::Parquet(r) => r.bytes_read(),
        }
    }

    /// Size of the input when known (not for standard input).
    pub fn total_bytes(&self) -> Option<u64> {
        match &self.inner {
            Inner::Jsonl(r) => r.total_bytes(),
            Inner::Parquet(r) => Some(r.total_bytes()),
        }
    }
}

impl Iterator for RowSource {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.inner {
            Inner::Jsonl(r) => r.next(),
            Inner::Parquet(r) => r.next(),
        }
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
