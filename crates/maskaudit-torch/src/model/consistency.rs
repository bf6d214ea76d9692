//! The trace-consistency probe, run: a batch's shortest row alone with padding appended and
//! its longest row alone, their logits against the batch's (what the probe checks and why:
//! `maskaudit_core::model::consistency`).

use tch::{Kind, Tensor};

pub use maskaudit_core::model::consistency::Consistency;

use super::{logit_tolerance, max_relative_difference, torch_message, LanguageModel, ModelError};

/// Padding columns appended past the batch's length: enough for a trace specialised to the
/// example's length to meet one it never saw, and cheap.
const EXTRA_COLUMNS: i64 = 8;

/// How far past the batch's length the probe may pad a row.
#[derive(Debug, Clone, Copy)]
pub enum Padding {
    /// [`EXTRA_COLUMNS`] more.
    Free,
    /// Up to this many positions in all (the model's position limit).
    UpTo(i64),
    /// None, for the reason given (the report's note).
    Off(&'static str),
}

/// Runs the probe on one batch. `logits` are the batch's own; `lengths` each row's length up
/// to its last real token; `padding` says how far the padded call may go.
pub fn probe<M: LanguageModel + ?Sized>(
    model: &M,
    input_ids: &Tensor,
    attention_mask: &Tensor,
    logits: &Tensor,
    lengths: &[i64],
    pad_id: i64,
    padding: Padding,
) -> Result<Consistency, ModelError> {
    let rows: Vec<usize> = (0..lengths.len()).collect();
    let batch = Rows {
        input_ids,
        attention_mask,
        logits,
        lengths,
        numbers: &rows,
    };
    probe_rows(model, batch, pad_id, padding)
}

/// Rows of a batch, with each one's number in the batch (0-based), for the notes.
struct Rows<'a> {
    input_ids: &'a Tensor,
    attention_mask: &'a Tensor,
    logits: &'a Tensor,
    lengths: &'a [i64],
    numbers: &'a [usize],
}

fn probe_rows<M: LanguageModel + ?Sized>(
    model: &M,
    batch: Rows,
    pad_id: i64,
    padding: Padding,
) -> Result<Consistency, ModelError> {
    let Rows {
        input_ids,
        attention_mask,
        logits,
        lengths,
        numbers,
    } = batch;
    let t = input_ids.size()[1];
    let mut out = Consistency {
        ran: true,
        longest_length: t,
        tolerance: logit_tolerance(logits.kind()),
        ..Default::default()
    };
    let mut notes = vec![];
    // Two calls of one row each, a fraction of one batch's forward: the shortest row alone
    // with padding appended (a batch size, a length and padding it never had in the batch),
    // and the longest row alone.
    let (longest, shortest) = match (longest_row(lengths), shortest_row(lengths)) {
        (Some(l), Some(s)) => (l, s),
        _ => {
            out.ran = false;
            out.note = "no row with a real token".into();
            return Ok(out);
        }
    };
    let calls = Calls {
        model,
        input_ids,
        attention_mask,
        logits,
        real: attention_mask.f_ne(0)?,
    };
    let extra = match padding {
        Padding::Free => EXTRA_COLUMNS,
        Padding::UpTo(max) => EXTRA_COLUMNS.min(max - t),
        Padding::Off(_) => 0,
    };
    if extra > 0 {
        match calls.padded(shortest, lengths[shortest], extra, pad_id)? {
            Ok(difference) => {
                out.longest_length = t + extra;
                out.padding_difference = Some(difference);
            }
            // A position limit the file does not record: not the model's fault.
            Err(e) => notes.push(format!(
                "the forward failed on a row padded to {} positions, so padding invariance was not checked: {}",
                t + extra,
                short(&e)
            )),
        }
    } else if let Padding::Off(why) = padding {
        notes.push(why.into());
    } else {
        notes.push("the batch is at the model's position limit: no padding appended".into());
    }
    let len = lengths[longest];
    let row = numbers[longest] + 1;
    match calls.alone(longest, len)? {
        Ok(difference) => out.row_difference = Some(difference),
        Err(e) => notes.push(alone_failed(&mut out, &e, row, len)),
    }
    out.rows_alone = if longest == shortest { 1 } else { 2 };
    out.note = notes.join("; ");
    Ok(out)
}

/// The rows of a batch the probe calls the model with (its shortest and its longest), with
/// their logits, copied out of the batch: the probe can then run later, on a thread of its own,
/// once the batch's tensors are gone. [`probe`] on these rows gives what it gives on the whole
/// batch (same rows, same width, same logits).
pub struct ProbeRows {
    input_ids: Tensor,
    attention_mask: Tensor,
    logits: Tensor,
    lengths: Vec<i64>,
    /// Each copied row's number in the batch.
    numbers: Vec<usize>,
}

impl ProbeRows {
    /// `None` when no row has a real token (the probe would not run on this batch).
    pub fn copy(
        input_ids: &Tensor,
        attention_mask: &Tensor,
        logits: &Tensor,
        lengths: &[i64],
    ) -> Result<Option<Self>, tch::TchError> {
        let (Some(longest), Some(shortest)) = (longest_row(lengths), shortest_row(lengths)) else {
            return Ok(None);
        };
        // In batch order, so that ties pick the same rows as on the whole batch.
        let mut rows = vec![shortest.min(longest), shortest.max(longest)];
        rows.dedup();
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let index = Tensor::f_from_slice(&index)?.f_to_device(input_ids.device())?;
        Ok(Some(Self {
            input_ids: input_ids.f_index_select(0, &index)?,
            attention_mask: attention_mask.f_index_select(0, &index)?,
            logits: logits.f_index_select(0, &index)?,
            lengths: rows.iter().map(|&r| lengths[r]).collect(),
            numbers: rows,
        }))
    }

    pub fn probe<M: LanguageModel + ?Sized>(
        &self,
        model: &M,
        pad_id: i64,
        padding: Padding,
    ) -> Result<Consistency, ModelError> {
        let rows = Rows {
            input_ids: &self.input_ids,
            attention_mask: &self.attention_mask,
            logits: &self.logits,
            lengths: &self.lengths,
            numbers: &self.numbers,
        };
        probe_rows(model, rows, pad_id, padding)
    }
}

/// The packing probe: one packed row's per-token losses, run with its own position ids,
/// against those of each of its documents run alone (positions from 0). Equal in a model
/// that keeps documents apart. Returns the largest |a − b| / max(1, |b|) over the documents'
/// targets (the target across a boundary excepted), and the logits' tolerance; `None` when no
/// document has two tokens.
pub fn packing_probe<M: LanguageModel + ?Sized>(
    model: &M,
    ids: &[i64],
    positions: &[i64],
    starts: &[usize],
) -> Result<Option<(f64, f64)>, ModelError> {
    let device = model.device();
    let run = |ids: &[i64], positions: &[i64]| -> Result<(Vec<f64>, Kind), ModelError> {
        let n = ids.len() as i64;
        let t = Tensor::f_from_slice(ids)?
            .f_view([1, n])?
            .f_to_device(device)?;
        let p = Tensor::f_from_slice(positions)?
            .f_view([1, n])?
            .f_to_device(device)?;
        let logits = model.logits_at(&t, &t.f_ones_like()?, &p)?;
        let kind = logits.kind();
        let lp = logits
            .f_narrow(1, 0, n - 1)?
            .f_log_softmax(-1, Kind::Double)?;
        let target = t.f_narrow(1, 1, n - 1)?.f_unsqueeze(-1)?;
        let nll = lp
            .f_gather(-1, &target, false)?
            .f_neg()?
            .f_flatten(0, -1)?
            .f_to_device(tch::Device::Cpu)?;
        Ok((Vec::<f64>::try_from(nll)?, kind))
    };
    let (packed, kind) = run(ids, positions)?;
    let mut bounds = vec![0];
    bounds.extend_from_slice(starts);
    bounds.push(ids.len());
    let mut worst: Option<f64> = None;
    for w in bounds.windows(2) {
        let (s, e) = (w[0], w[1]);
        if e < s + 2 {
            continue;
        }
        let own: Vec<i64> = (0..(e - s) as i64).collect();
        let (alone, _) = run(&ids[s..e], &own)?;
        for (a, b) in packed[s..e - 1].iter().zip(&alone) {
            let d = (a - b).abs() / b.abs().max(1.0);
            worst = Some(worst.map_or(d, |w: f64| {
                w.max(if d.is_nan() { f64::INFINITY } else { d })
            }));
        }
    }
    Ok(worst.map(|w| (w, logit_tolerance(kind))))
}

/// The probe's calls on rows of one batch, compared with the batch's own logits.
struct Calls<'a, M: ?Sized> {
    model: &'a M,
    input_ids: &'a Tensor,
    attention_mask: &'a Tensor,
    logits: &'a Tensor,
    /// Where the attention mask is not 0: the positions compared.
    real: Tensor,
}

/// A call's difference from the batch, or the model's error (the outer `Result` is libtorch's).
type Call = Result<Result<f64, ModelError>, ModelError>;

impl<M: LanguageModel + ?Sized> Calls<'_, M> {
    fn row(t: &Tensor, r: usize, len: i64) -> Result<Tensor, tch::TchError> {
        t.f_narrow(0, r as i64, 1)?.f_narrow(1, 0, len)
    }

    /// Row `r` (`len` real tokens) padded to the batch's length and `extra` columns beyond:
    /// its own padding, then more.
    fn padded(&self, r: usize, len: i64, extra: i64, pad_id: i64) -> Call {
        let t = self.input_ids.size()[1];
        let device = self.input_ids.device();
        let pad = Tensor::f_full([1, extra], pad_id, (Kind::Int64, device))?;
        let ids = Tensor::f_cat(&[&Self::row(self.input_ids, r, t)?, &pad], 1)?;
        let mask = Tensor::f_cat(
            &[&Self::row(self.attention_mask, r, t)?, &pad.f_zeros_like()?],
            1,
        )?;
        match self.model.logits(&ids, &mask) {
            Ok(padded) => Ok(Ok(self.difference(r, len, &padded.f_narrow(1, 0, len)?)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// Row `r`'s first `len` tokens alone.
    fn alone(&self, r: usize, len: i64) -> Call {
        match self.model.logits(
            &Self::row(self.input_ids, r, len)?,
            &Self::row(self.attention_mask, r, len)?,
        ) {
            Ok(alone) => Ok(Ok(self.difference(r, len, &alone)?)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// How far `other` is from row `r`'s logits in the batch, over its real tokens.
    fn difference(&self, r: usize, len: i64, other: &Tensor) -> Result<f64, tch::TchError> {
        max_relative_difference(
            &Self::row(self.logits, r, len)?,
            other,
            Some(&Self::row(&self.real, r, len)?),
        )
    }
}

fn longest_row(lengths: &[i64]) -> Option<usize> {
    (0..lengths.len())
        .filter(|&i| lengths[i] > 0)
        .max_by_key(|&i| (lengths[i], std::cmp::Reverse(i)))
}

fn shortest_row(lengths: &[i64]) -> Option<usize> {
    (0..lengths.len())
        .filter(|&i| lengths[i] > 0)
        .min_by_key(|&i| (lengths[i], i))
}

/// The note on a row-alone call that failed: the row ran in the batch, so a shorter, narrower
/// call must run too, and its failure is the model's (an infinite difference), unless memory
/// ran out (on a GPU the probe's calls share it with the next batch): then it was not checked.
fn alone_failed(out: &mut Consistency, e: &ModelError, row: usize, len: i64) -> String {
    if out_of_memory(e) {
        return format!("row {row} of the batch alone was not checked: {}", short(e));
    }
    out.row_difference = Some(f64::INFINITY);
    format!(
        "the forward failed on row {row} of the batch alone ({len} tokens): {}",
        short(e)
    )
}

fn out_of_memory(e: &ModelError) -> bool {
    is_out_of_memory(&e.to_string())
}

/// Whether a libtorch error says memory ran out (CUDA's caching allocator, or the CPU's).
pub fn is_out_of_memory(text: &str) -> bool {
    [
        "out of memory",
        "can't allocate memory",
        "not enough memory",
    ]
    .iter()
    .any(|m| text.contains(m))
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
            let c = probe(&toy, &ids, &mask, &logits, &[4, 2], 0, Padding::Free).unwrap();
            assert_eq!(c.passed(), pass, "{c:?}");
            assert_eq!((c.rows_alone, c.longest_length), (2, 12));
        }
        let toy = Toy { length_leak: false };
        let logits = toy.logits(&ids, &mask).unwrap();
        let c = probe(&toy, &ids, &mask, &logits, &[4, 2], 0, Padding::UpTo(6)).unwrap();
        assert_eq!(c.longest_length, 6);
    }

    /// The toy model, failing every one-row call with `message`.
    struct FailsAlone(&'static str);

    impl LanguageModel for FailsAlone {
        fn vocab_size(&self) -> i64 {
            5
        }
        fn device(&self) -> Device {
            Device::Cpu
        }
        fn logits(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, ModelError> {
            if ids.size()[0] == 1 {
                return Err(ModelError::Torch(self.0.into()));
            }
            Toy { length_leak: false }.logits(ids, mask)
        }
    }

    /// A row that fails alone fails the probe, naming its row in the batch (also from copied
    /// rows), unless memory ran out: then it was not checked.
    #[test]
    fn a_failing_row_alone_fails_the_probe_unless_memory_ran_out() {
        let ids = Tensor::from_slice(&[1i64, 2, 0, 0, 1, 2, 3, 4, 3, 0, 0, 0]).view([3, 4]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let lengths = [2, 4, 1];
        for (message, passed) in [
            ("RuntimeError: shape mismatch", false),
            ("CUDA out of memory. Tried to allocate 2.00 GiB", true),
        ] {
            let model = FailsAlone(message);
            let logits = model.logits(&ids, &mask).unwrap();
            let rows = ProbeRows::copy(&ids, &mask, &logits, &lengths)
                .unwrap()
                .unwrap();
            let c = rows.probe(&model, 0, Padding::Off("off")).unwrap();
            assert_eq!(c.passed(), passed, "{c:?}");
            assert_eq!(c.row_difference.is_some(), !passed, "{c:?}");
            assert!(c.note.contains("row 2 of the batch alone"), "{c:?}");
        }
    }

    #[test]
    fn the_copied_rows_give_what_the_whole_batch_gives() {
        // Four rows: the probe takes the shortest (row 2) and the longest (row 1).
        let ids =
            Tensor::from_slice(&[1i64, 2, 0, 0, 1, 2, 3, 4, 3, 0, 0, 0, 2, 2, 1, 0]).view([4, 4]);
        let mask = ids.ne(0).to_kind(Kind::Int64);
        let lengths = [2, 4, 1, 3];
        for leak in [false, true] {
            let toy = Toy { length_leak: leak };
            let logits = toy.logits(&ids, &mask).unwrap();
            let whole = probe(&toy, &ids, &mask, &logits, &lengths, 0, Padding::Free).unwrap();
            let rows = ProbeRows::copy(&ids, &mask, &logits, &lengths)
                .unwrap()
                .unwrap();
            assert_eq!(
                (rows.lengths.as_slice(), rows.numbers.as_slice()),
                (&[4, 1][..], &[1, 2][..])
            );
            let copied = rows.probe(&toy, 0, Padding::Free).unwrap();
            assert_eq!(format!("{whole:?}"), format!("{copied:?}"));
            assert_eq!(whole.passed(), !leak);
        }
        let none = ProbeRows::copy(
            &ids,
            &mask,
            &Tensor::zeros([4, 4, 5], (Kind::Float, Device::Cpu)),
            &[0; 4],
        );
        assert!(none.unwrap().is_none());
    }
}
