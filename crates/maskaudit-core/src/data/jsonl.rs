//! JSONL rows: one JSON object per line; blank lines are skipped but counted.

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read};

use serde_json::value::RawValue;

use super::documents;
use super::echo::echo;
use super::{validate, DataError, FieldNames, Pos, RawRow, Row};

/// The longest line read by default (`--max-line-bytes`).
pub const DEFAULT_MAX_LINE_BYTES: usize = 256 << 20;

/// Streams rows from JSONL text (a file, standard input, or a decompressor).
pub struct JsonlReader {
    path: String,
    reader: Box<dyn BufRead + Send>,
    fields: FieldNames,
    line_no: usize,
    buf: Vec<u8>,
    bytes_read: u64,
    total_bytes: Option<u64>,
    max_line_bytes: usize,
    /// Set after an error: a line too long or unreadable leaves no place to resume from.
    stopped: bool,
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
            buf: Vec::new(),
            bytes_read: 0,
            total_bytes,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            stopped: false,
        }
    }

    /// Lines longer than this many bytes (newline excluded) are an error, read no further.
    pub fn set_max_line_bytes(&mut self, max: usize) {
        self.max_line_bytes = max;
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
        if self.stopped {
            return None;
        }
        loop {
            self.line_no += 1;
            let at = Pos::line(self.line_no);
            let read = read_line_bounded(self.reader.as_mut(), &mut self.buf, self.max_line_bytes);
            let error = match read {
                Ok(Line::End) => return None,
                Ok(Line::Read(n)) => {
                    self.bytes_read += n as u64;
                    match std::str::from_utf8(&self.buf) {
                        Ok(text) if text.trim().is_empty() => continue,
                        Ok(text) => {
                            return Some(parse_row(text, &self.path, self.line_no, &self.fields))
                        }
                        Err(e) => DataError::Record {
                            path: self.path.clone(),
                            at,
                            message: format!(
                                "not UTF-8 text (invalid byte at column {})",
                                e.valid_up_to() + 1
                            ),
                        },
                    }
                }
                Ok(Line::TooLong) => DataError::Record {
                    path: self.path.clone(),
                    at,
                    message: format!(
                        "line longer than {} bytes (--max-line-bytes): not JSONL, or raise the limit",
                        self.max_line_bytes
                    ),
                },
                Err(source) => DataError::Read {
                    path: self.path.clone(),
                    at,
                    source,
                },
            };
            self.stopped = true;
            return Some(Err(error));
        }
    }
}

impl Iterator for JsonlReader {
    type Item = Result<Row, DataError>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_row()
    }
}

/// What [`read_line_bounded`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line of this many bytes, its newline included, is in the buffer.
    Read(usize),
    /// The end of the input.
    End,
    /// More than the limit before a newline; the buffer holds at most the limit.
    TooLong,
}

/// Line length from which the buffer is reserved up to the limit in one step.
const RESERVE_WHOLE_LINE_FROM: usize = 1 << 20;

/// `BufRead::read_line` that never holds more than `max` bytes (plus the newline): a file
/// with no newline, or a decompression bomb, stops at the limit instead of filling memory.
fn read_line_bounded(reader: &mut dyn BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Line> {
    buf.clear();
    loop {
        let chunk = match reader.fill_buf() {
            Ok(chunk) => chunk,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(if buf.is_empty() {
                Line::End
            } else {
                Line::Read(buf.len())
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let content = take - usize::from(done);
        if buf.len() + content > max {
            return Ok(Line::TooLong);
        }
        if buf.len() + take > buf.capacity() && buf.capacity() >= RESERVE_WHOLE_LINE_FROM {
            // Reserve up to the limit once: pages become resident only as they are written,
            // and the line is not copied at each doubling (which held 1.5 times the limit).
            let _ = buf.try_reserve_exact(max.saturating_add(1).saturating_sub(buf.len()));
        }
        buf.extend_from_slice(&chunk[..take]);
        reader.consume(take);
        if done {
            return Ok(Line::Read(buf.len()));
        }
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
            message: format!("not a JSON object: {}", echo(&strip_position(&e))),
        })?;
    let mut raw = RawRow::default();
    let mut from_mask = None;
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
        let field_error = |message: String| DataError::Field {
            path: path.to_string(),
            at,
            field: name.to_string(),
            message,
        };
        let values = match serde_json::from_str::<Vec<i64>>(value.get()) {
            Ok(values) => values,
            Err(_) if name == fields.attention_mask && value.get().starts_with("[[") => {
                let (attention, cu) = block_mask(value.get()).map_err(field_error)?;
                from_mask = Some(cu);
                attention
            }
            Err(e) => {
                return Err(field_error(format!(
                    "expected an array of integers: {}",
                    echo(&strip_position(&e))
                )))
            }
        };
        *slot = Some(values);
    }
    if raw.cu_seqlens.is_none() {
        raw.cu_seqlens = from_mask.filter(|cu| cu.len() > 2);
    }
    validate(raw, path, at, fields)
}

/// A packed row's 2D (`[T, T]`) or 4D (`[1, 1, T, T]`) attention mask in JSON, read by
/// [`documents::block_mask`].
fn block_mask(text: &str) -> Result<(Vec<i64>, Vec<i64>), String> {
    use serde_json::Value;
    let mut value: Value = serde_json::from_str(text).map_err(|e| strip_position(&e))?;
    while let Value::Array(items) = &value {
        match items.first() {
            Some(Value::Array(inner))
                if items.len() == 1 && inner.first().is_some_and(Value::is_array) =>
            {
                value = items[0].clone();
            }
            _ => break,
        }
    }
    let Value::Array(rows) = value else {
        return Err(documents::BLOCK_MASK_EXPECTED.to_string());
    };
    let rows: Option<Vec<Vec<Option<bool>>>> = rows
        .iter()
        .map(|row| match row {
            Value::Array(cells) => Some(
                cells
                    .iter()
                    .map(|c| match c {
                        Value::Bool(b) => Some(*b),
                        Value::Number(x) => x.as_i64().and_then(documents::mask_cell),
                        _ => None,
                    })
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    documents::block_mask(rows.ok_or_else(|| documents::BLOCK_MASK_EXPECTED.to_string())?)
}

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
    fn block_diagonal_masks_give_documents_and_padding() {
        // Two documents of 2 tokens, then a padding token; 4D, as transformers takes it.
        let r = parse(
            r#"{"input_ids":[5,6,7,8,0],"attention_mask":[[[[1,0,0,0,0],[1,1,0,0,0],[0,0,1,0,0],[0,0,1,1,0],[0,0,0,0,0]]]]}"#,
        )
        .unwrap();
        assert_eq!(r.attention_mask, vec![1, 1, 1, 1, 0]);
        assert_eq!(r.cu_seqlens, Some(vec![0, 2, 5]));
        // 2D, booleans, one document: not packed.
        let r =
            parse(r#"{"input_ids":[5,6],"attention_mask":[[true,false],[true,true]]}"#).unwrap();
        assert_eq!((r.attention_mask, r.cu_seqlens), (vec![1, 1], None));
        let msg = parse(r#"{"input_ids":[5,6],"attention_mask":[[1,1],[1,1]]}"#)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "d.jsonl:7: attention_mask: query 0 sees key 1 after it: not a causal mask"
        );
        let msg = parse(r#"{"input_ids":[5,6],"attention_mask":[[1],[1,1]]}"#)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not square"), "{msg}");
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
    fn lines_are_read_up_to_the_limit_only() {
        let mut input = io::Cursor::new(b"abc\nabcd\nab".to_vec());
        let mut buf = vec![];
        let mut read = || read_line_bounded(&mut input, &mut buf, 3).unwrap();
        assert_eq!(read(), Line::Read(4));
        assert_eq!(read(), Line::TooLong);
        // A line with no newline, longer than the limit, from a source that never ends.
        let mut zeros = BufReader::with_capacity(7, io::repeat(0));
        assert_eq!(
            read_line_bounded(&mut zeros, &mut buf, 100).unwrap(),
            Line::TooLong
        );
        assert!(buf.len() <= 100, "{}", buf.len());
        // Long lines: the buffer is reserved once, up to the limit, never beyond it.
        let max = 3 << 20;
        let mut zeros = BufReader::with_capacity(1 << 16, io::repeat(0));
        assert_eq!(
            read_line_bounded(&mut zeros, &mut buf, max).unwrap(),
            Line::TooLong
        );
        assert!(
            buf.len() <= max && buf.capacity() <= max + 1,
            "{}",
            buf.capacity()
        );
        let mut line = vec![b'x'; (5 << 19) - 1];
        line.push(b'\n');
        let mut long = io::Cursor::new(line);
        assert_eq!(
            read_line_bounded(&mut long, &mut buf, max).unwrap(),
            Line::Read(5 << 19)
        );
        let mut last = io::Cursor::new(b"ab".to_vec());
        assert_eq!(
            read_line_bounded(&mut last, &mut buf, 3).unwrap(),
            Line::Read(2)
        );
        assert_eq!(
            read_line_bounded(&mut last, &mut buf, 3).unwrap(),
            Line::End
        );
    }

    #[test]
    fn a_long_line_is_an_error_naming_the_line_and_the_option() {
        let bytes =
            b"{\"input_ids\":[1]}\n{\"input_ids\":[1,2,3,4,5,6,7,8,9]}\n{\"input_ids\":[1]}\n";
        let mut reader = reader_from_bytes("d.jsonl", bytes.to_vec(), FieldNames::default());
        reader.set_max_line_bytes(20);
        assert!(reader.next().unwrap().is_ok());
        let err = reader.next().unwrap().unwrap_err().to_string();
        assert_eq!(
            err,
            "d.jsonl:2: line longer than 20 bytes (--max-line-bytes): not JSONL, or raise the limit"
        );
        assert!(reader.next().is_none(), "no rows after the error");
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let bytes = b"{\"input_ids\":[1]}\n{\"input_ids\":[1]\xff}\n".to_vec();
        let err = reader_from_bytes("d.jsonl", bytes, FieldNames::default())
            .nth(1)
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "d.jsonl:2: not UTF-8 text (invalid byte at column 17)"
        );
    }

    #[test]
    fn quoted_values_are_cut_and_escaped() {
        let line = format!("{{\"input_ids\":\"\\u001b[31m{}\"}}", "x".repeat(100_000));
        let err = parse(&line).unwrap_err().to_string();
        // serde_json quotes the string with Rust's escapes; no raw ESC either way.
        assert!(!err.contains('\x1b') && err.contains("[31m"), "{err}");
        assert!(err.contains("characters cut"), "{err}");
        assert!(err.len() < 400, "{}", err.len());
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
