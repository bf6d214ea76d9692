//! Reading pre-tokenized datasets, one row at a time.
//!
//! A row is one JSON object per line (JSONL). Only the fields maskaudit needs are decoded;
//! everything else on the line is skipped unparsed. Rows are validated here so that nothing
//! malformed reaches libtorch: every error names the file, the line and the field.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::value::RawValue;

/// The Hugging Face ignore index: a label equal to it is not trained.
pub const IGNORE_INDEX: i64 = -100;

/// Names of the fields a row is read from.
#[derive(Debug, Clone)]
pub struct FieldNames {
    pub input_ids: String,
    pub labels: String,
    pub loss_mask: String,
    pub attention_mask: String,
}

impl Default for FieldNames {
    fn default() -> Self {
        Self {
            input_ids: "input_ids".into(),
            labels: "labels".into(),
            loss_mask: "loss_mask".into(),
            attention_mask: "attention_mask".into(),
        }
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

/// One validated row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// 1-based line number in the file.
    pub line: usize,
    pub input_ids: Vec<i64>,
    /// Aligned with `input_ids`: 1 where the token is a training target.
    pub mask: Vec<u8>,
    /// Aligned with `input_ids`: 1 for real tokens, 0 for padding already in the file.
    pub attention_mask: Vec<u8>,
    pub mask_source: MaskSource,
}

/// Bad input: always reported as `file:line: field: message`.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {source}")]
    Read {
        path: String,
        line: usize,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line {
        path: String,
        line: usize,
        message: String,
    },
    #[error("{path}:{line}: {field}: {message}")]
    Field {
        path: String,
        line: usize,
        field: String,
        message: String,
    },
    #[error("{path}: no rows: the dataset is empty")]
    Empty { path: String },
}

/// Streams rows from a JSONL file or standard input (`-`).
pub struct JsonlReader {
    path: String,
    reader: Box<dyn BufRead + Send>,
    fields: FieldNames,
    line_no: usize,
    buf: String,
    bytes_read: u64,
    total_bytes: Option<u64>,
}

impl JsonlReader {
    pub fn open(path: &Path, fields: FieldNames) -> Result<Self, DataError> {
        let display = path.display().to_string();
        let (reader, total_bytes): (Box<dyn BufRead + Send>, Option<u64>) = if display == "-" {
            (Box::new(BufReader::new(io::stdin())), None)
        } else {
            let file = File::open(path).map_err(|source| DataError::Open {
                path: display.clone(),
                source,
            })?;
            let len = file.metadata().ok().map(|m| m.len());
            if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
                return Err(DataError::Open {
                    path: display,
                    source: io::Error::other("is a directory"),
                });
            }
            (Box::new(BufReader::with_capacity(1 << 20, file)), len)
        };
        Ok(Self::from_reader(display, reader, total_bytes, fields))
    }

    pub fn from_reader(
        path: String,
        reader: Box<dyn BufRead + Send>,
        total_bytes: Option<u64>,
        fields: FieldNames,
    ) -> Self {
        Self {
            path,
            reader,
            fields,
            line_no: 0,
            buf: String::new(),
            bytes_read: 0,
            total_bytes,
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// Bytes consumed so far, for progress reporting.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }

    /// Size of the input when known (not for standard input).
    pub fn total_bytes(&self) -> Option<u64> {
        self.total_bytes
    }

    fn next_row(&mut self) -> Option<Result<Row, DataError>> {
        loop {
            self.buf.clear();
            self.line_no += 1;
            match self.reader.read_line(&mut self.buf) {
                Ok(0) => return None,
                Ok(n) => self.bytes_read += n as u64,
                Err(source) => {
                    return Some(Err(DataError::Read {
                        path: self.path.clone(),
                        line: self.line_no,
                        source,
                    }))
                }
            }
            if self.buf.trim().is_empty() {
                continue;
            }
            return Some(parse_row(&self.buf, &self.path, self.line_no, &self.fields));
        }
    }
}

impl Iterator for JsonlReader {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

/// Opens a reader over a path that may be `-`; kept separate so tests can feed bytes.
pub fn reader_from_bytes(name: &str, bytes: Vec<u8>, fields: FieldNames) -> JsonlReader {
    let len = bytes.len() as u64;
    let cursor: Box<dyn Read + Send> = Box::new(io::Cursor::new(bytes));
    JsonlReader::from_reader(
        name.to_string(),
        Box::new(BufReader::new(cursor)),
        Some(len),
        fields,
    )
}

/// Parses and validates one line.
pub fn parse_row(
    text: &str,
    path: &str,
    line: usize,
    fields: &FieldNames,
) -> Result<Row, DataError> {
    let line_err = |message: String| DataError::Line {
        path: path.to_string(),
        line,
        message,
    };
    let field_err = |field: &str, message: String| DataError::Field {
        path: path.to_string(),
        line,
        field: field.to_string(),
        message,
    };
    let object: HashMap<String, &RawValue> = serde_json::from_str(text)
        .map_err(|e| line_err(format!("not a JSON object: {}", strip_position(&e))))?;

    let int_array = |name: &str| -> Result<Option<Vec<i64>>, DataError> {
        match object.get(name) {
            None => Ok(None),
            Some(raw) if raw.get() == "null" => Ok(None),
            Some(raw) => serde_json::from_str::<Vec<i64>>(raw.get())
                .map(Some)
                .map_err(|e| {
                    field_err(
                        name,
                        format!("expected an array of integers: {}", strip_position(&e)),
                    )
                }),
        }
    };

    let input_ids = int_array(&fields.input_ids)?
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

    let loss_mask = int_array(&fields.loss_mask)?
        .map(|v| binary(&fields.loss_mask, v))
        .transpose()?;
    let attention_mask = int_array(&fields.attention_mask)?
        .map(|v| binary(&fields.attention_mask, v))
        .transpose()?;
    let labels = int_array(&fields.labels)?;
    if let Some(labels) = &labels {
        check_len(&fields.labels, labels.len())?;
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
    let attention_mask = attention_mask.unwrap_or_else(|| vec![1; len]);

    Ok(Row {
        line,
        input_ids,
        mask,
        attention_mask,
        mask_source,
    })
}

/// serde_json appends "at line 1 column N"; within one line the column is noise.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
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

    fn parse(text: &str) -> Result<Row, DataError> {
        parse_row(text, "d.jsonl", 7, &FieldNames::default())
    }

    #[test]
    fn mask_precedence_loss_mask_then_labels_then_attention() {
        let r = parse(r#"{"input_ids":[5,6,7],"loss_mask":[0,1,1],"labels":[-100,-100,7],"attention_mask":[1,1,0]}"#).unwrap();
        assert_eq!(r.mask, vec![0, 1, 1]);
        assert_eq!(r.mask_source, MaskSource::LossMask);
        let r = parse(r#"{"input_ids":[5,6,7],"labels":[-100,6,-100],"attention_mask":[1,1,0]}"#)
            .unwrap();
        assert_eq!(r.mask, vec![0, 1, 0]);
        assert_eq!(r.mask_source, MaskSource::Labels);
        let r = parse(r#"{"input_ids":[5,6,7],"attention_mask":[1,1,0]}"#).unwrap();
        assert_eq!(r.mask, vec![1, 1, 0]);
        assert_eq!(r.attention_mask, vec![1, 1, 0]);
        assert_eq!(r.mask_source, MaskSource::AttentionMask);
        let r = parse(r#"{"input_ids":[5,6,7],"text":"ignored"}"#).unwrap();
        assert_eq!(r.mask, vec![1, 1, 1]);
        assert_eq!(r.mask_source, MaskSource::AllTokens);
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let msg = |t: &str| parse(t).unwrap_err().to_string();
        assert_eq!(
            msg(r#"{"input_ids":[1,-2]}"#),
            "d.jsonl:7: input_ids: negative token id -2 at index 1"
        );
        assert!(msg(r#"{"input_ids":[1,2.5]}"#)
            .starts_with("d.jsonl:7: input_ids: expected an array of integers"));
        assert_eq!(
            msg(r#"{"input_ids":[1,2],"labels":[1]}"#),
            "d.jsonl:7: labels: has 1 entries but input_ids has 2"
        );
        assert_eq!(
            msg(r#"{"input_ids":[1,2],"loss_mask":[1,2]}"#),
            "d.jsonl:7: loss_mask: value 2 at index 1: expected 0 or 1"
        );
        assert_eq!(
            msg(r#"{"labels":[1]}"#),
            "d.jsonl:7: input_ids: missing (required)"
        );
        assert!(msg("{not json").starts_with("d.jsonl:7: not a JSON object"));
        assert!(msg("[1,2]").starts_with("d.jsonl:7: not a JSON object"));
    }

    #[test]
    fn reader_skips_blank_lines_and_counts_lines() {
        let bytes = b"{\"input_ids\":[1,2]}\n\n{\"input_ids\":[3]}\n".to_vec();
        let rows: Vec<Row> = reader_from_bytes("x", bytes, FieldNames::default())
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3]);
    }
}
