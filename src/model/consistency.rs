//! The trace-consistency probe: does the model give a real token the same logits however the
//! batch around it is shaped?
//!
//! For a causal model with right padding, the logits at real positions must not move when
//! padding columns are appended, nor when a row runs alone instead of in its batch. A trace
//! that baked in the example's shape, a model that derives position ids from the attention
//! mask, or rotary embeddings rescaled by length (dynamic RoPE) break this, and every loss
//! maskaudit computes from such a model is wrong without a sign. The probe runs on the first
//! batch's longest and shortest rows only: one padded forward of the two and one forward of
//! each alone, a fraction of one batch's cost.

use serde::Serialize;
use tch::{Kind, Tensor};

use super::{logit_tolerance, relative_difference, torch_message, LanguageModel, ModelError};

#[derive(Debug, Clone, Default, Serialize)]
pub struct Consistency {
    /// False with `--no-model-probe`, or when no batch had two tokens.
    pub ran: bool,
    /// Rows of the first batch the probe ran on (padded, and alone): its longest and shortest.
    pub rows_alone: usize,
    /// The longest sequence the model was called with (the padded batch).
    pub longest_length: i64,
    /// Largest relative change of a real position's logits when padding was appended.
    pub padding_difference: Option<f64>,
    /// Largest relative change of a real position's logits when its row ran alone.
    pub row_difference: Option<f64>,
    /// Relative change above which the model fails (by the logits' dtype).
    pub tolerance: f64,
    /// What was skipped or failed, in words; empty when all ran.
    pub note: String,
}

impl Consistency {
    pub fn passed(&self) -> bool {
        let ok = |d: Option<f64>| d.is_none_or(|d| d <= self.tolerance);
        ok(self.padding_difference) && ok(self.row_difference)
    }
}

/// Padding columns appended: at least 8, or half the batch's length, so that a trace
/// specialised to the example's length meets a length it never saw.
fn extra_columns(seq_len: i64) -> i64 {
    (seq_len / 2).max(8)
}

/// The rows the probe runs on: the longest and the shortest with a real token (one if they
/// are the same row).
fn probe_rows(lengths: &[i64]) -> Vec<usize> {
    let real = || lengths.iter().enumerate().filter(|(_, &l)| l > 0);
    let longest = real()
        .max_by_key(|(i, &l)| (l, std::cmp::Reverse(*i)))
        .map(|(i, _)| i);
    let shortest = real().min_by_key(|(_, &l)| l).map(|(i, _)| i);
    let mut rows: Vec<usize> = longest.into_iter().chain(shortest).collect();
    rows.dedup();
    rows
}

/// Runs the probe on one batch. `logits` are the batch's own; `lengths` each row's length up
/// to its last real token; `max_len` caps the padded length (the model's position limit).
pub fn probe<M: LanguageModel + ?Sized>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    logits: &Tensor,
    lengths: &[i64],
    pad_id: i64,
    max_len: Option<i64>,
) -> Result<Consistency, ModelError> {
    let t = input_ids.size()[1];
    let mut out = Consistency {
        ran: true,
        longest_length: t,
        tolerance: logit_tolerance(logits.kind()),
        ..Default::default()
    };
    let mut notes = vec![];
    // Two rows carry the probe, the longest and the shortest, so that it costs a fraction of
    // one batch's forward (the compute benchmark's overhead target is 10% of the whole run).
    let picked = probe_rows(lengths);
    let index = Tensor::f_from_slice(&picked.iter().map(|&r| r as i64).collect::<Vec<_>>())?
        .f_to_device(input_ids.device())?;
    let input_ids = input_ids.f_index_select(0, &index)?;
    let attention_mask = attention_mask.f_index_select(0, &index)?;
    let logits = logits.f_index_select(0, &index)?;
    let lengths: Vec<i64> = picked.iter().map(|&r| lengths[r]).collect();
    let b = picked.len() as i64;
    let real = attention_mask.f_ne(0)?;

    let extra = match max_len {
        Some(max) => extra_columns(t).min(max - t),
        None => extra_columns(t),
    };
    if extra > 0 && b > 0 {
        let device = input_ids.device();
        let pad = Tensor::f_full([b, extra], pad_id, (Kind::Int64, device))?;
        let ids = Tensor::f_cat(&[&input_ids, &pad], 1)?;
        let mask = Tensor::f_cat(&[&attention_mask, &pad.f_zeros_like()?], 1)?;
        match model.logits(&ids, &mask) {
            Ok(padded) => {
                out.longest_length = t + extra;
                let padded = padded.f_narrow(1, 0, t)?;
                out.padding_difference =
                    Some(relative_difference(&logits, &padded, Some(&real))?);
            }
            // A position limit the file does not record: not the model's fault.
            Err(e) => notes.push(format!(
                "the forward failed on the batch padded to {} positions, so padding invariance was not checked: {}",
                t + extra,
                short(&e)
            )),
        }
    } else if b > 0 {
        notes.push("the batch is at the model's position limit: no padding appended".into());
    }

    let mut worst: f64 = 0.0;
    for (k, &len) in lengths.iter().enumerate() {
        let row = k as i64;
        let ids = input_ids.f_narrow(0, row, 1)?.f_narrow(1, 0, len)?;
        let mask = attention_mask.f_narrow(0, row, 1)?.f_narrow(1, 0, len)?;
        let keep = real.f_narrow(0, row, 1)?.f_narrow(1, 0, len)?;
        let batched = logits.f_narrow(0, row, 1)?.f_narrow(1, 0, len)?;
        match model.logits(&ids, &mask) {
            Ok(alone) => worst = worst.max(relative_difference(&batched, &alone, Some(&keep))?),
            // It ran in the batch, so a shorter, narrower call must run too.
            Err(e) => {
                worst = f64::INFINITY;
                notes.push(format!(
                    "the forward failed on row {} of the batch alone ({len} tokens): {}",
                    picked[k] + 1,
                    short(&e)
                ));
            }
        }
        out.rows_alone += 1;
    }
    out.row_difference = Some(worst);
    out.note = notes.join("; ");
    Ok(out)
}

fn short(e: &ModelError) -> String {
    torch_message(&e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// A toy "model" whose logits at t depend on tokens ≤ t only, or, broken, on the batch's
    /// length too.
    struct Toy {
        length_leak: bool,
    }

    impl LanguageModel for Toy {
        fn vocab_size(&self) -> i64 {
            5
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn logits(&self, ids: &Tensor, _mask: &Tensor) -> Result<Tensor, ModelError> {
            let t = ids.size()[1];
            let x = ids
                .to_kind(Kind::Float)
                .cumsum(1, Kind::Float)
                .unsqueeze(-1);
            let x = x.repeat([1, 1, 5]) * Tensor::arange(5, (Kind::Float, Device::Cpu));
            Ok(if self.length_leak { x + t as f64 } else { x })
        }
    }

    #[test]
    fn a_causal_model_passes_and_a_length_dependent_one_fails() {
        let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 2, 1, 0, 0]).view([2, 4]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        for (leak, pass) in [(false, true), (true, false)] {
            let toy = Toy { length_leak: leak };
            let logits = toy.logits(&ids, &mask).unwrap();
            let c = probe(&toy, &ids, &mask, &logits, &[4, 2], 0, None).unwrap();
            assert_eq!(c.passed(), pass, "{c:?}");
            assert_eq!((c.rows_alone, c.longest_length), (2, 12));
        }
        let toy = Toy { length_leak: false };
        let logits = toy.logits(&ids, &mask).unwrap();
        let c = probe(&toy, &ids, &mask, &logits, &[4, 2], 0, Some(6)).unwrap();
        assert_eq!(c.longest_length, 6);
    }
}
