//! The documents of a packed row: where they start (from `position_ids` restarting at 0,
//! `seq_lens`, `cu_seqlens`, or a block-diagonal attention mask, read as `cu_seqlens`), the
//! position ids a model that keeps them apart is given, and the row split into one row per
//! document for a model that cannot. One definition for `lint`, the batcher and `check`.
#![warn(clippy::arithmetic_side_effects)]

use std::collections::BTreeSet;

use crate::data::{PaddingSpan, Row};

/// Token indices where a packed row's documents start, the first excepted, inside the row's
/// content (`span`: a left-padded row's positions restart at its first real token, its
/// padding's at the padding).
pub fn starts(row: &Row, span: PaddingSpan) -> Vec<usize> {
    let mut starts = BTreeSet::new();
    if let Some(positions) = &row.position_ids {
        starts.extend((1..positions.len()).filter(|&i| positions[i] == 0));
    }
    if let Some(lens) = &row.seq_lens {
        let mut at = 0usize;
        for &n in lens {
            at = at.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            starts.insert(at);
        }
    }
    if let Some(cu) = &row.cu_seqlens {
        starts.extend(cu.iter().map(|&b| usize::try_from(b).unwrap_or(usize::MAX)));
    }
    starts
        .into_iter()
        .filter(|&s| s > span.start && s < span.end)
        .collect()
}

/// What a block mask must be, for the error that names one that is not.
pub const BLOCK_MASK_EXPECTED: &str =
    "expected a 1D mask, or a square 2D/4D block-diagonal causal mask of 0/1";

/// A block mask's cell: 1 or 0 (`None` for anything else).
pub fn mask_cell(v: i64) -> Option<bool> {
    match v {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// A packed row's 2D (`[T, T]`) or 4D (`[1, 1, T, T]`, the leading dimensions of 1 already
/// taken off by the reader) attention mask, true where query i sees key j, `None` for a cell
/// that is not 0/1: its 1D attention mask (the diagonal: a token that sees nothing is padding)
/// and its documents as `cu_seqlens` (a document starts where a token does not see the one
/// before it). Anything but a square causal mask of 0/1 is an error. One rule for every format.
pub fn block_mask(rows: Vec<Vec<Option<bool>>>) -> Result<(Vec<i64>, Vec<i64>), String> {
    let n = rows.len();
    let mut m = Vec::with_capacity(n);
    for cells in rows {
        if cells.len() != n {
            return Err(format!(
                "a {n}-row mask has a row of {} entries: not square",
                cells.len()
            ));
        }
        let cells: Option<Vec<bool>> = cells.into_iter().collect();
        m.push(cells.ok_or_else(|| BLOCK_MASK_EXPECTED.to_string())?);
    }
    if let Some((i, j)) = (0..n)
        .flat_map(|i| (i.saturating_add(1)..n).map(move |j| (i, j)))
        .find(|&(i, j)| m[i][j])
    {
        return Err(format!(
            "query {i} sees key {j} after it: not a causal mask"
        ));
    }
    let attention = m.iter().enumerate().map(|(i, r)| i64::from(r[i])).collect();
    let mut cu = vec![0];
    cu.extend(
        (1..n)
            .filter(|&i| {
                let before = i.wrapping_sub(1);
                m[i][i] && m[before][before] && !m[i][before]
            })
            .map(|i| i as i64),
    );
    cu.push(n as i64);
    Ok((attention, cu))
}

/// Whether a row is packed: several documents, or a field that says so.
pub fn is_packed(row: &Row, starts: &[usize]) -> bool {
    !starts.is_empty() || row.seq_lens.is_some() || row.cu_seqlens.is_some()
}

/// The position ids the model gets for a row: its own when given, else restarting at 0 at
/// each document start (`starts`), else 0, 1, … (what transformers uses without any).
pub fn positions(row: &Row, starts: &[usize]) -> Vec<i64> {
    if let Some(p) = &row.position_ids {
        return p.clone();
    }
    let mut out = Vec::with_capacity(row.input_ids.len());
    let mut next = starts.iter().peekable();
    let mut p = 0i64;
    for i in 0..row.input_ids.len() {
        if next.peek() == Some(&&i) {
            next.next();
            p = 0;
        }
        out.push(p);
        p = p.saturating_add(1);
    }
    out
}

/// The row as one row per document, each a row of its own (positions from 0, its own
/// attention, labels and mask); the first keeps any left padding, the last any trailing.
pub fn split(row: &Row, starts: &[usize]) -> Vec<Row> {
    let len = row.input_ids.len();
    let mut bounds = vec![0];
    bounds.extend(starts.iter().copied().filter(|&s| s > 0 && s < len));
    bounds.push(len);
    bounds
        .windows(2)
        .map(|w| {
            let r = w[0]..w[1];
            Row {
                line: row.line,
                input_ids: row.input_ids[r.clone()].to_vec(),
                mask: row.mask[r.clone()].to_vec(),
                attention_mask: row.attention_mask[r.clone()].to_vec(),
                mask_source: row.mask_source,
                attention_mask_given: row.attention_mask_given,
                labels: row.labels.as_ref().map(|l| l[r.clone()].to_vec()),
                position_ids: None,
                seq_lens: None,
                cu_seqlens: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packed(ids: &[i64]) -> Row {
        Row::new(1, ids.to_vec())
    }

    #[test]
    fn documents_come_from_any_field() {
        let mut r = packed(&[5, 6, 7, 8, 9]);
        let all = PaddingSpan::none(5);
        assert!(!is_packed(&r, &starts(&r, all)));
        r.position_ids = Some(vec![0, 1, 0, 1, 2]);
        assert_eq!(starts(&r, all), vec![2]);
        r.position_ids = None;
        r.cu_seqlens = Some(vec![0, 2, 5]);
        assert_eq!(starts(&r, all), vec![2]);
        assert_eq!(positions(&r, &[2]), vec![0, 1, 0, 1, 2]);
        r.cu_seqlens = None;
        r.seq_lens = Some(vec![1, 3, 1]);
        let s = starts(&r, all);
        assert_eq!(s, vec![1, 4]);
        assert!(is_packed(&r, &s));
        assert_eq!(positions(&r, &s), vec![0, 0, 1, 2, 0]);
        // Given position ids are passed as they are.
        r.position_ids = Some(vec![0, 0, 1, 2, 0]);
        assert_eq!(positions(&r, &[]), vec![0, 0, 1, 2, 0]);
    }

    #[test]
    fn a_split_keeps_each_documents_fields() {
        let fields = crate::data::FieldNames::default();
        let r = crate::data::parse_row(
            r#"{"input_ids":[5,6,7,8,9],"labels":[-100,6,-100,8,9],"position_ids":[0,1,0,1,2]}"#,
            "d",
            3,
            &fields,
        )
        .unwrap();
        let parts = split(&r, &starts(&r, PaddingSpan::none(5)));
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].input_ids, vec![5, 6]);
        assert_eq!(parts[1].labels, Some(vec![-100, 8, 9]));
        assert_eq!(parts[1].mask, vec![0, 1, 1]);
        assert!(parts
            .iter()
            .all(|p| p.line == 3 && p.position_ids.is_none()));
    }
}
