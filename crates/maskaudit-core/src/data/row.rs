//! One record: its fields as read ([`RawRow`]), validated into a [`Row`].

use super::{
    DataError, FieldNames, MaskSource, Pos, CU_SEQLENS_FIELD, IGNORE_INDEX, SEQ_LENS_FIELD,
};

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

/// Validates the fields of one record and builds its [`Row`]. The checks run in a fixed
/// order (ids, masks, labels, positions, packing) and the first failure is the error.
pub fn validate(raw: RawRow, path: &str, at: Pos, fields: &FieldNames) -> Result<Row, DataError> {
    let input_ids = raw.input_ids.ok_or_else(|| DataError::Field {
        path: path.to_string(),
        at,
        field: fields.input_ids.clone(),
        message: "missing (required)".into(),
    })?;
    let v = Validator {
        path,
        at,
        fields,
        len: input_ids.len(),
    };
    v.token_ids(&input_ids)?;
    let loss_mask = raw
        .loss_mask
        .map(|m| v.binary(&fields.loss_mask, m))
        .transpose()?;
    let attention_mask = raw
        .attention_mask
        .map(|m| v.binary(&fields.attention_mask, m))
        .transpose()?;
    let labels = raw.labels;
    if let Some(labels) = &labels {
        v.same_length(&fields.labels, labels.len())?;
    }
    if let Some(position_ids) = &raw.position_ids {
        v.position_ids(position_ids)?;
    }
    if let Some(seq_lens) = &raw.seq_lens {
        v.seq_lens(seq_lens)?;
    }
    if let Some(cu) = &raw.cu_seqlens {
        v.cu_seqlens(cu)?;
    }
    let len = v.len;
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

/// One record's checks, each naming the field it rejects.
struct Validator<'a> {
    path: &'a str,
    at: Pos,
    fields: &'a FieldNames,
    /// The length of `input_ids`, which every aligned field must have.
    len: usize,
}

impl Validator<'_> {
    fn err(&self, field: &str, message: String) -> DataError {
        DataError::Field {
            path: self.path.to_string(),
            at: self.at,
            field: field.to_string(),
            message,
        }
    }

    fn token_ids(&self, ids: &[i64]) -> Result<(), DataError> {
        let field = &self.fields.input_ids;
        if ids.is_empty() {
            return Err(self.err(field, "empty: a row needs at least one token".into()));
        }
        if let Some((i, id)) = ids.iter().enumerate().find(|(_, id)| **id < 0) {
            return Err(self.err(field, format!("negative token id {id} at index {i}")));
        }
        Ok(())
    }

    fn same_length(&self, name: &str, n: usize) -> Result<(), DataError> {
        if n != self.len {
            let message = format!(
                "has {n} entries but {} has {}",
                self.fields.input_ids, self.len
            );
            return Err(self.err(name, message));
        }
        Ok(())
    }

    /// A mask: as long as the ids, every value 0 or 1.
    fn binary(&self, name: &str, values: Vec<i64>) -> Result<Vec<u8>, DataError> {
        self.same_length(name, values.len())?;
        values
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                0 | 1 => Ok(*v as u8),
                _ => Err(self.err(name, format!("value {v} at index {i}: expected 0 or 1"))),
            })
            .collect()
    }

    fn position_ids(&self, positions: &[i64]) -> Result<(), DataError> {
        let field = &self.fields.position_ids;
        self.same_length(field, positions.len())?;
        if let Some((i, p)) = positions.iter().enumerate().find(|(_, p)| **p < 0) {
            return Err(self.err(field, format!("negative position {p} at index {i}")));
        }
        Ok(())
    }

    fn seq_lens(&self, seq_lens: &[i64]) -> Result<(), DataError> {
        if let Some((i, n)) = seq_lens.iter().enumerate().find(|(_, n)| **n < 0) {
            return Err(self.err(SEQ_LENS_FIELD, format!("negative length {n} at index {i}")));
        }
        let total: i64 = seq_lens.iter().fold(0i64, |a, &n| a.saturating_add(n));
        if total > self.len as i64 {
            let message = format!(
                "the lengths sum to {total} but {} has {} tokens",
                self.fields.input_ids, self.len
            );
            return Err(self.err(SEQ_LENS_FIELD, message));
        }
        Ok(())
    }

    fn cu_seqlens(&self, cu: &[i64]) -> Result<(), DataError> {
        let len = self.len;
        let mut previous = 0i64;
        for (i, &b) in cu.iter().enumerate() {
            if b < previous || b > len as i64 {
                let message = format!(
                    "boundary {b} at index {i}: expected non-decreasing offsets within 0..={len}"
                );
                return Err(self.err(CU_SEQLENS_FIELD, message));
            }
            previous = b;
        }
        Ok(())
    }
}
