//! Rollout rows (policy losses) and preference pairs (DPO/IPO), read from JSONL.
//!
//! Per-token fields are aligned with `input_ids`: entry t belongs to token t (its log-prob is
//! that of token t given the tokens before it; entry 0 is never used), as `loss_mask` is. The
//! loss gets them from entry 1 on, aligned with the next-token targets.
//!
//! A rollout row: `input_ids`; a response mask from `response_mask`, `loss_mask`,
//! `completion_mask` or `labels` (−100 = not trained), the first one present, 0 over the
//! prompt and tool output; `advantages` (a number, `[number]`, or one per token);
//! optionally `attention_mask` (0 = padding in the row), `old_logprobs`, `ref_logprobs`
//! (one per token; `null` entries read as NaN, as rollouts leave masked slots undefined).
//!
//! A preference pair is either one row with trl's tokenized fields `prompt_ids`, `chosen_ids`,
//! `rejected_ids` (the input of trl's `DataCollatorForPreference`), or two rows sharing a
//! `pair_id` with `role` `"chosen"` and `"rejected"`, each a rollout row without advantages.
//! Pure: no tensors.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use super::{display_path, DataError, FieldNames, Pos, IGNORE_INDEX};

/// Mask fields tried in order when no `--loss-mask-field` names one.
pub const RESPONSE_MASK_FIELDS: [&str; 2] = ["response_mask", "completion_mask"];

/// A row's advantages: one per row, or one per token (aligned with `input_ids`).
#[derive(Debug, Clone, PartialEq)]
pub enum Advantages {
    Row(f64),
    Token(Vec<f64>),
}

/// One validated rollout row.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRow {
    pub line: usize,
    pub input_ids: Vec<i64>,
    /// 1 where the token is a trained response token, aligned with `input_ids`.
    pub mask: Vec<u8>,
    /// 0 where the row itself holds padding.
    pub attention_mask: Vec<u8>,
    pub advantages: Option<Advantages>,
    pub old_logprobs: Option<Vec<f64>>,
    pub ref_logprobs: Option<Vec<f64>>,
}

/// A chosen row and a rejected row.
#[derive(Debug, Clone, PartialEq)]
pub struct PreferencePair {
    pub chosen: RolloutRow,
    pub rejected: RolloutRow,
}

/// Which per-row fields the loss needs from the data.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    pub advantages: bool,
}

fn field_err(path: &str, line: usize, field: &str, message: impl Into<String>) -> DataError {
    DataError::Field {
        path: path.to_string(),
        at: Pos::line(line),
        field: field.to_string(),
        message: message.into(),
    }
}

/// One JSON record's fields, checked as they are taken.
struct Record<'a> {
    path: &'a str,
    line: usize,
    object: serde_json::Map<String, Value>,
}

impl Record<'_> {
    fn err(&self, field: &str, message: impl Into<String>) -> DataError {
        field_err(self.path, self.line, field, message)
    }

    fn get(&self, field: &str) -> Option<&Value> {
        self.object.get(field).filter(|v| !v.is_null())
    }

    fn ints(&self, field: &str) -> Result<Option<Vec<i64>>, DataError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.err(field, "expected a list of integers"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.as_i64().ok_or_else(|| {
                    self.err(
                        field,
                        format!("value {x} at index {i}: expected an integer"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Numbers, `null` entries as NaN.
    fn floats(&self, field: &str) -> Result<Option<Vec<f64>>, DataError> {
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let items = v
            .as_array()
            .ok_or_else(|| self.err(field, "expected a list of numbers"))?;
        items
            .iter()
            .enumerate()
            .map(|(i, x)| match x {
                Value::Null => Ok(f64::NAN),
                _ => x.as_f64().ok_or_else(|| {
                    self.err(field, format!("value {x} at index {i}: expected a number"))
                }),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn mask(&self, field: &str, len: usize) -> Result<Option<Vec<u8>>, DataError> {
        let Some(values) = self.ints(field)? else {
            return Ok(None);
        };
        self.aligned(field, values.len(), len)?;
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| match v {
                0 | 1 => Ok(v as u8),
                _ => Err(self.err(field, format!("value {v} at index {i}: expected 0 or 1"))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    fn aligned(&self, field: &str, n: usize, len: usize) -> Result<(), DataError> {
        if n != len {
            return Err(self.err(
                field,
                format!("has {n} entries but input_ids has {len} (per-token fields are aligned with input_ids)"),
            ));
        }
        Ok(())
    }

    fn advantages(&self, len: usize) -> Result<Option<Advantages>, DataError> {
        let field = "advantages";
        let Some(v) = self.get(field) else {
            return Ok(None);
        };
        let finite = |x: f64, what: String| {
            if x.is_finite() {
                Ok(x)
            } else {
                Err(self.err(field, format!("{what}: not a finite number")))
            }
        };
        if let Some(x) = v.as_f64() {
            return finite(x, "the value".into()).map(|x| Some(Advantages::Row(x)));
        }
        let values = self.floats(field)?.unwrap_or_default();
        match values.len() {
            1 => finite(values[0], "the value".into()).map(|x| Some(Advantages::Row(x))),
            n if n == len => Ok(Some(Advantages::Token(values))),
            n => Err(self.err(
                field,
                format!("has {n} entries: expected a number, [number], or one per token of input_ids ({len})"),
            )),
        }
    }
}

/// One rollout row from a record's fields.
fn rollout(
    r: &Record,
    fields: &FieldNames,
    ids_field: &str,
    needs: Needs,
) -> Result<RolloutRow, DataError> {
    let input_ids = r
        .ints(ids_field)?
        .ok_or_else(|| r.err(ids_field, "missing (required)"))?;
    if input_ids.len() < 2 {
        return Err(r.err(ids_field, "a rollout row needs at least two tokens"));
    }
    if let Some((i, id)) = input_ids.iter().enumerate().find(|(_, id)| **id < 0) {
        return Err(r.err(ids_field, format!("negative token id {id} at index {i}")));
    }
    let len = input_ids.len();
    let mut mask = None;
    for field in [
        RESPONSE_MASK_FIELDS[0],
        fields.loss_mask.as_str(),
        RESPONSE_MASK_FIELDS[1],
    ] {
        if mask.is_none() {
            mask = r.mask(field, len)?;
        }
    }
    if mask.is_none() {
        if let Some(labels) = r.ints(&fields.labels)? {
            r.aligned(&fields.labels, labels.len(), len)?;
            mask = Some(
                labels
                    .iter()
                    .map(|&l| u8::from(l != IGNORE_INDEX))
                    .collect(),
            );
        }
    }
    let mask = mask.ok_or_else(|| {
        r.err(
            "response_mask",
            format!(
                "missing: a rollout row needs response_mask, {}, completion_mask or {} (-100 over prompt and tool output)",
                fields.loss_mask, fields.labels
            ),
        )
    })?;
    let attention_mask = r
        .mask(&fields.attention_mask, len)?
        .unwrap_or_else(|| vec![1; len]);
    let advantages = r.advantages(len)?;
    if needs.advantages && advantages.is_none() {
        return Err(r.err("advantages", "missing (the loss takes advantages)"));
    }
    let per_token = |field: &str| -> Result<Option<Vec<f64>>, DataError> {
        let v = r.floats(field)?;
        if let Some(v) = &v {
            r.aligned(field, v.len(), len)?;
        }
        Ok(v)
    };
    Ok(RolloutRow {
        line: r.line,
        input_ids,
        mask,
        attention_mask,
        advantages,
        old_logprobs: per_token("old_logprobs")?,
        ref_logprobs: per_token("ref_logprobs")?,
    })
}

/// A JSON record's fields.
pub(super) type JsonObject = serde_json::Map<String, Value>;

/// The file's records: (line, object), blank lines skipped; gzip told by its magic bytes.
fn records(path: &Path) -> Result<Vec<(usize, JsonObject)>, DataError> {
    let shown = display_path(path);
    let open = |e| DataError::Open {
        path: shown.clone(),
        source: e,
    };
    let file = std::fs::File::open(path).map_err(open)?;
    let mut head = BufReader::new(file);
    let gz = head.fill_buf().map_err(open)?.starts_with(&[0x1f, 0x8b]);
    if head.fill_buf().map_err(open)?.starts_with(b"PAR1") {
        return super::rollout_parquet::records(path, &shown);
    }
    let reader: Box<dyn Read> = if gz {
        Box::new(flate2::read::MultiGzDecoder::new(head))
    } else {
        Box::new(head)
    };
    let mut out = vec![];
    for (i, line) in BufReader::new(reader).lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| DataError::Read {
            path: shown.clone(),
            at: Pos::line(n),
            source: e,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record = |message: String| DataError::Record {
            path: shown.clone(),
            at: Pos::line(n),
            message,
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(o)) => out.push((n, o)),
            Ok(_) => return Err(record("expected a JSON object".into())),
            Err(e) => return Err(record(format!("invalid JSON: {e}"))),
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty { path: shown });
    }
    Ok(out)
}

/// Every rollout row of the file.
pub fn read_rollouts(
    path: &Path,
    fields: &FieldNames,
    needs: Needs,
) -> Result<Vec<RolloutRow>, DataError> {
    let shown = display_path(path);
    records(path)?
        .into_iter()
        .map(|(line, object)| {
            let r = Record {
                path: &shown,
                line,
                object,
            };
            rollout(&r, fields, &fields.input_ids, needs)
        })
        .collect()
}

/// Every preference pair of the file, in the order their first row appears.
pub fn read_pairs(path: &Path, fields: &FieldNames) -> Result<Vec<PreferencePair>, DataError> {
    let shown = display_path(path);
    let mut pairs: Vec<(String, Option<RolloutRow>, Option<RolloutRow>, usize)> = vec![];
    let mut index: HashMap<String, usize> = HashMap::new();
    for (line, object) in records(path)? {
        let r = Record {
            path: &shown,
            line,
            object,
        };
        if r.get("chosen_ids").is_some() || r.get("prompt_ids").is_some() {
            pairs.push((format!("line {line}"), None, None, line));
            let n = pairs.len() - 1;
            let (chosen, rejected) = trl_pair(&r)?;
            pairs[n].1 = Some(chosen);
            pairs[n].2 = Some(rejected);
            continue;
        }
        let id = match r.get("pair_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(x)) => x.to_string(),
            Some(_) => return Err(r.err("pair_id", "expected a string or a number")),
            None => {
                return Err(r.err(
                    "pair_id",
                    "missing: a preference row needs pair_id and role, or prompt_ids, chosen_ids and rejected_ids",
                ))
            }
        };
        let role = r.get("role").and_then(Value::as_str).map(str::to_string);
        let row = rollout(&r, fields, &fields.input_ids, Needs::default())?;
        let n = *index.entry(id.clone()).or_insert_with(|| {
            pairs.push((id.clone(), None, None, line));
            pairs.len() - 1
        });
        let slot = match role.as_deref() {
            Some("chosen") => &mut pairs[n].1,
            Some("rejected") => &mut pairs[n].2,
            _ => return Err(r.err("role", "expected \"chosen\" or \"rejected\"")),
        };
        if slot.is_some() {
            return Err(r.err(
                "role",
                format!("pair {id} has a second {} row", role.unwrap_or_default()),
            ));
        }
        *slot = Some(row);
    }
    pairs
        .into_iter()
        .map(|(id, chosen, rejected, line)| match (chosen, rejected) {
            (Some(chosen), Some(rejected)) => Ok(PreferencePair { chosen, rejected }),
            (None, _) => Err(field_err(
                &shown,
                line,
                "role",
                format!("pair {id} has no chosen row"),
            )),
            (_, None) => Err(field_err(
                &shown,
                line,
                "role",
                format!("pair {id} has no rejected row"),
            )),
        })
        .collect()
}

/// trl's tokenized preference example: prompt + chosen and prompt + rejected, the completion
/// trained (what `DataCollatorForPreference` builds as `completion_mask`).
fn trl_pair(r: &Record) -> Result<(RolloutRow, RolloutRow), DataError> {
    let take = |field: &str| -> Result<Vec<i64>, DataError> {
        let v = r.ints(field)?.ok_or_else(|| {
            r.err(
                field,
                "missing: a trl preference row needs prompt_ids, chosen_ids and rejected_ids",
            )
        })?;
        if let Some((i, id)) = v.iter().enumerate().find(|(_, id)| **id < 0) {
            return Err(r.err(field, format!("negative token id {id} at index {i}")));
        }
        Ok(v)
    };
    let prompt = take("prompt_ids")?;
    let row = |field: &str| -> Result<RolloutRow, DataError> {
        let completion = take(field)?;
        if prompt.len() + completion.len() < 2 {
            return Err(r.err(
                field,
                "prompt and completion together need at least two tokens",
            ));
        }
        let mut mask = vec![0u8; prompt.len()];
        mask.extend(std::iter::repeat_n(1u8, completion.len()));
        let input_ids: Vec<i64> = prompt.iter().chain(&completion).copied().collect();
        Ok(RolloutRow {
            line: r.line,
            attention_mask: vec![1; input_ids.len()],
            input_ids,
            mask,
            advantages: None,
            old_logprobs: None,
            ref_logprobs: None,
        })
    };
    Ok((row("chosen_ids")?, row("rejected_ids")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(lines: &[&str]) -> tempfile_like::Temp {
        tempfile_like::Temp::new(lines)
    }

    /// A file under the target directory, removed on drop.
    mod tempfile_like {
        use super::*;
        pub struct Temp(pub std::path::PathBuf);
        impl Temp {
            pub fn new(lines: &[&str]) -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let p = std::env::temp_dir().join(format!(
                    "maskaudit-rollout-{}-{n}.jsonl",
                    std::process::id()
                ));
                let mut f = std::fs::File::create(&p).unwrap();
                for l in lines {
                    writeln!(f, "{l}").unwrap();
                }
                Temp(p)
            }
        }
        impl Drop for Temp {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn rollouts(lines: &[&str]) -> Result<Vec<RolloutRow>, String> {
        let f = file(lines);
        read_rollouts(&f.0, &FieldNames::default(), Needs { advantages: true })
            .map_err(|e| e.to_string().replace(&f.0.display().to_string(), "d.jsonl"))
    }

    #[test]
    fn rollout_rows_take_their_mask_and_advantages() {
        let rows = rollouts(&[
            r#"{"input_ids": [1, 2, 3, 4], "response_mask": [0, 0, 1, 1], "advantages": 0.5}"#,
            r#"{"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "advantages": [1.5], "old_logprobs": [null, -1, -2]}"#,
            r#"{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "advantages": [0, 1, 2]}"#,
        ])
        .unwrap();
        assert_eq!(rows[0].mask, vec![0, 0, 1, 1]);
        assert_eq!(rows[0].advantages, Some(Advantages::Row(0.5)));
        assert_eq!(rows[1].mask, vec![0, 1, 1]);
        assert_eq!(rows[1].advantages, Some(Advantages::Row(1.5)));
        assert!(rows[1].old_logprobs.as_ref().unwrap()[0].is_nan());
        assert_eq!(
            rows[2].advantages,
            Some(Advantages::Token(vec![0.0, 1.0, 2.0]))
        );
    }

    #[test]
    fn bad_rollout_fields_name_file_line_and_field() {
        let err = |line: &str| rollouts(&["", line]).unwrap_err();
        assert_eq!(
            err(r#"{"input_ids": [1, 2], "response_mask": [0, 1]}"#),
            "d.jsonl:2: advantages: missing (the loss takes advantages)"
        );
        assert_eq!(
            err(r#"{"input_ids": [1, 2], "response_mask": [0, 1], "advantages": [1, 2, 3]}"#),
            "d.jsonl:2: advantages: has 3 entries: expected a number, [number], or one per token of input_ids (2)"
        );
        assert!(err(r#"{"input_ids": [1, 2], "advantages": 1}"#)
            .starts_with("d.jsonl:2: response_mask: missing"));
        assert_eq!(
            err(r#"{"input_ids": [1, 2], "response_mask": [0, 2], "advantages": 1}"#),
            "d.jsonl:2: response_mask: value 2 at index 1: expected 0 or 1"
        );
        assert!(err(r#"{"input_ids": [1, 2], "response_mask": [0, 1], "advantages": 1, "old_logprobs": [1]}"#)
            .starts_with("d.jsonl:2: old_logprobs: has 1 entries"));
        assert!(
            err(r#"{"input_ids": [1, 2], "response_mask": [0, 1], "advantages": "x"}"#)
                .starts_with("d.jsonl:2: advantages: expected a list of numbers")
        );
        assert!(err("[1]").starts_with("d.jsonl:2: expected a JSON object"));
    }

    #[test]
    fn preference_pairs_come_from_trl_rows_or_pair_ids() {
        let f = file(&[
            r#"{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}"#,
            r#"{"pair_id": "a", "role": "rejected", "input_ids": [1, 4], "completion_mask": [0, 1]}"#,
            r#"{"pair_id": "a", "role": "chosen", "input_ids": [1, 3, 3], "completion_mask": [0, 1, 1]}"#,
        ]);
        let pairs = read_pairs(&f.0, &FieldNames::default()).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[0].chosen.input_ids, vec![1, 2, 3]);
        assert_eq!(pairs[0].rejected.mask, vec![0, 0, 1, 1]);
        assert_eq!(pairs[1].chosen.input_ids, vec![1, 3, 3]);
        let f = file(&[
            r#"{"pair_id": 7, "role": "chosen", "input_ids": [1, 3], "completion_mask": [0, 1]}"#,
        ]);
        let e = read_pairs(&f.0, &FieldNames::default())
            .unwrap_err()
            .to_string();
        assert!(e.ends_with(":1: role: pair 7 has no rejected row"), "{e}");
    }
}
