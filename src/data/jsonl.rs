//! JSONL rows: one JSON object per line; blank lines are skipped but counted.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use serde_json::value::RawValue;

use super::{validate, DataError, FieldNames, Pos, RawRow, Row};

/// Streams rows from JSONL text (a file, standard input, or a decompressor).
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

    /// Bytes of text consumed so far.
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
                        at: Pos::line(self.line_no),
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

/// A reader over bytes in memory, for tests.
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
    let at = Pos::line(line);
    let object: HashMap<String, &RawValue> =
        serde_json::from_str(text).map_err(|e| DataError::Record {
            path: path.to_string(),
            at,
            message: format!("not a JSON object: {}", strip_position(&e)),
        })?;
    let mut raw = RawRow::default();
    for name in fields.all() {
        let Some(value) = object.get(name) else {
            continue;
        };
        let Some(slot) = raw.slot(fields, name) else {
            continue;
        };
        if slot.is_some() || value.get() == "null" {
            continue;
        }
        let values =
            serde_json::from_str::<Vec<i64>>(value.get()).map_err(|e| DataError::Field {
                path: path.to_string(),
                at,
                field: name.to_string(),
                message: format!("expected an array of integers: {}", strip_position(&e)),
            })?;
        *slot = Some(values);
    }
    validate(raw, path, at, fields)
}

/// serde_json appends "at line 1 column N"; within one line the column is noise.
fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.rfind(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::MaskSource;

    fn parse(text: &str) -> Result<Row, DataError> {
        parse_row(text, "d.jsonl", 7, &FieldNames::default())
    }

    #[test]
    fn mask_precedence_loss_mask_then_labels_then_attention() {
        let r = parse(r#"{"input_ids":[5,6,7],"loss_mask":[0,1,1],"labels":[-100,-100,7],"attention_mask":[1,1,0]}"#).unwrap();
        assert_eq!(r.mask, vec![0, 1, 1]);
        assert_eq!(r.mask_source, MaskSource::LossMask);
        assert_eq!(r.labels, Some(vec![-100, -100, 7]));
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
        assert!(msg(r#"{"input_ids":[1],"seq_lens":"x"}"#)
            .starts_with("d.jsonl:7: seq_lens: expected an array of integers"));
        assert!(msg("{not json").starts_with("d.jsonl:7: not a JSON object"));
        assert!(msg("[1,2]").starts_with("d.jsonl:7: not a JSON object"));
    }

    #[test]
    fn renamed_fields_are_read() {
        let fields = FieldNames {
            input_ids: "tokens".into(),
            position_ids: "input_pos".into(),
            ..FieldNames::default()
        };
        let r = parse_row(
            r#"{"tokens":[1,2,3],"input_pos":[0,0,1],"seq_lens":[1,2]}"#,
            "d",
            1,
            &fields,
        )
        .unwrap();
        assert_eq!(r.input_ids, vec![1, 2, 3]);
        assert_eq!(r.position_ids, Some(vec![0, 0, 1]));
        assert_eq!(r.seq_lens, Some(vec![1, 2]));
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
