//! A plain audit on a GPU: one batch in flight while the host reads the previous one's losses,
//! and the consistency probe on a thread of its own.

use anyhow::Result;
use indicatif::ProgressBar;
use tch::{Device, Tensor};

use super::batches::{check_length_limit, probe_padding, with_tf32_tolerance, RunState};
use super::timing::Timing;
use super::CheckOptions;
use crate::data::batch::Batch;
use crate::model::consistency::{self, Consistency, ProbeRows};
use crate::model::{self, CudaEvent, LoadedModel, ModelError};
use maskaudit_core::loss::aggregate::LossTotals;
use maskaudit_torch::loss::batch::{rounded_columns, BatchTensors};

/// The batches of a plain audit on a GPU through [`Overlap`]. The consistency probe's rows are
/// copied out of the first batch and probed on a thread of its own while the later batches
/// run: its two one-row calls, the kernels they load on first use and its waits for their
/// results otherwise hold the batches back (docs/performance.md, "Figures behind the code").
/// Both threads queue on the device's default stream; tch's `CModule` may be called
/// from several threads.
pub(super) fn stream(
    model: &dyn LoadedModel,
    opts: &CheckOptions,
    batches: impl Iterator<Item = Result<(Batch, u64)>>,
    (totals, run): (&mut LossTotals, &mut RunState),
    progress: &ProgressBar,
    timing: &mut Timing,
    mut overlap: Overlap,
) -> Result<()> {
    let pad_id = opts.pad_id.unwrap_or(0);
    std::thread::scope(|scope| {
        let mut probe = None;
        let batches_run = (|| -> Result<()> {
            for item in batches {
                let (batch, bytes_read) = match item {
                    Ok(item) => item,
                    Err(e) => {
                        // The batch in flight comes first in the file: its error first.
                        overlap.finish(model, totals, run, opts)?;
                        return Err(e);
                    }
                };
                let want = run.probe && probe.is_none() && !run.consistency.ran;
                match overlap.push(model, batch, totals, run, opts, want)? {
                    ProbeWork::Rows(rows) => {
                        let padding = probe_padding(model);
                        probe = Some(scope.spawn(move || {
                            // Gradient mode is per thread.
                            let _no_grad = tch::no_grad_guard();
                            rows.probe(model, pad_id, padding)
                        }));
                    }
                    ProbeWork::NotRun(probed) => {
                        run.consistency = with_tf32_tolerance(model, probed);
                    }
                    ProbeWork::None => {}
                }
                progress.set_position(bytes_read);
            }
            overlap.finish(model, totals, run, opts)
        })();
        // Joined before any error leaves the scope, which would panic on a panicked thread.
        let probed = probe.map(|p| {
            p.join()
                .map_err(|_| anyhow::anyhow!("the consistency probe's thread panicked"))
                .and_then(|r| r.map_err(anyhow::Error::from))
        });
        let probed = probed.map(|p| p.or_else(|e| out_of_memory(model, e)));
        // The probed batch comes before the batches whose errors could follow it.
        if let Some(Err(e)) = probed {
            return Err(e);
        }
        batches_run?;
        timing.mark("the batches");
        if let Some(times) = &overlap.times {
            timing.note(&times.summary());
        }
        if let Some(Ok(probed)) = probed {
            run.consistency = with_tf32_tolerance(model, probed);
            timing.mark("the consistency probe, after the batches");
        }
        Ok(())
    })
}

/// One batch in flight on a GPU: its losses are computed and copied (non-blocking, into pinned
/// host memory) on the device's queue, and an event marks the end of that copy. The host reads
/// them only after it has queued the next batch, so the GPU goes from one batch's work to the
/// next without waiting for the host to read losses, aggregate, take the next batch and upload
/// it. Used for a plain audit on CUDA (no user loss, no step simulation, which need each batch's
/// logits or results in turn); the environment variable `MASKAUDIT_OVERLAP=0` turns it off (for
/// measuring it).
pub(super) struct Overlap {
    pub(super) active: bool,
    pub(super) device_index: usize,
    pub(super) in_flight: Option<InFlight>,
    /// Whether batches are rounded up to fewer shapes (`CheckOptions::shape_buckets`).
    pub(super) shape_buckets: bool,
    /// With `MASKAUDIT_TIMING=1`: where the GPU's time went, batch by batch.
    pub(super) times: Option<GpuTimes>,
}

/// A batch whose losses are on their way to the host.
pub(super) struct InFlight {
    pub(super) batch: Batch,
    /// f32 `[B·(T-1)]` and a bool scalar, in host memory once `done` has completed.
    pub(super) losses: Tensor,
    pub(super) finite: Tensor,
    /// `None` when CUDA events are not at hand: reading `losses` then waits for the device.
    pub(super) done: Option<CudaEvent>,
    /// With [`GpuTimes`]: events before the upload and after the forward.
    pub(super) marks: Option<(CudaEvent, CudaEvent)>,
}

/// `MASKAUDIT_TIMING=1` on a GPU: GPU time by part of a batch, from CUDA events recorded
/// around each batch's work (the consistency probe's work, queued on the same stream from its
/// thread, falls in whichever part it lands in).
#[derive(Default)]
pub(super) struct GpuTimes {
    batches: usize,
    /// The upload of the ids and mask, and the forward.
    forward_ms: f64,
    /// The cross-entropy and the copies of its results to the host.
    loss_ms: f64,
    /// From one batch's end to the next one's start: the GPU waiting for the host.
    idle_ms: f64,
    last_end: Option<CudaEvent>,
}

impl GpuTimes {
    fn add(&mut self, marks: Option<(CudaEvent, CudaEvent)>, done: Option<CudaEvent>) {
        let (Some((start, forwarded)), Some(done)) = (marks, done) else {
            return;
        };
        let ms = |a: &CudaEvent, b: &CudaEvent| f64::from(a.elapsed_ms(b).unwrap_or(0.0));
        self.batches += 1;
        self.forward_ms += ms(&start, &forwarded);
        self.loss_ms += ms(&forwarded, &done);
        if let Some(last) = &self.last_end {
            self.idle_ms += ms(last, &start);
        }
        self.last_end = Some(done);
    }

    pub(super) fn summary(&self) -> String {
        format!(
            "GPU time over {} batches: upload and forward {:.3} s, cross-entropy and copies to the host {:.3} s, idle between batches {:.3} s",
            self.batches,
            self.forward_ms / 1e3,
            self.loss_ms / 1e3,
            self.idle_ms / 1e3
        )
    }
}

impl Overlap {
    pub(super) fn new(device: Device, opts: &CheckOptions, timed: bool) -> Self {
        let device_index = match device {
            Device::Cuda(n) => Some(n),
            _ => None,
        };
        Self {
            active: device_index.is_some()
                && opts.loss.is_none()
                && opts.steps.is_none()
                && opts.overlap,
            device_index: device_index.unwrap_or(0),
            in_flight: None,
            shape_buckets: opts.shape_buckets,
            times: timed.then(GpuTimes::default),
        }
    }

    /// Queues `batch` on the device, then reads the batch queued before it. With `want_rows`,
    /// returns the consistency probe's work on this batch.
    pub(super) fn push(
        &mut self,
        model: &dyn LoadedModel,
        batch: Batch,
        totals: &mut LossTotals,
        run: &mut RunState,
        opts: &CheckOptions,
        want_rows: bool,
    ) -> Result<ProbeWork> {
        let queued = self.queue(model, batch, run, opts, want_rows);
        // Errors in file order: the batch before this one first.
        let previous = self.in_flight.take();
        if let Some(previous) = previous {
            self.read(previous, model, totals, run, opts)?;
        }
        match queued? {
            Queued::InFlight(next, probe) => {
                self.in_flight = Some(next);
                Ok(probe)
            }
            Queued::Empty(batch) => {
                run.count_empty(&batch, totals, opts);
                Ok(ProbeWork::None)
            }
        }
    }

    /// Reads the last batch in flight.
    pub(super) fn finish(
        &mut self,
        model: &dyn LoadedModel,
        totals: &mut LossTotals,
        run: &mut RunState,
        opts: &CheckOptions,
    ) -> Result<()> {
        match self.in_flight.take() {
            Some(last) => self.read(last, model, totals, run, opts),
            None => Ok(()),
        }
    }

    pub(super) fn queue(
        &self,
        model: &dyn LoadedModel,
        batch: Batch,
        run: &RunState,
        opts: &CheckOptions,
        want_rows: bool,
    ) -> Result<Queued> {
        let line = batch.lines.first().copied().unwrap_or(0);
        if batch.seq_len < 2 {
            return Ok(Queued::Empty(batch));
        }
        check_length_limit(model, &batch, run.unit, line)?;
        let path = model::path_string(&opts.model);
        let timed = self.times.is_some();
        let start = timed.then(|| CudaEvent::record_timed(self.device_index));
        let t = batch.seq_len;
        let columns = self.columns(model, &batch);
        let in_batch = |e: tch::TchError| ModelError::in_batch(&path, line, &e);
        let pad_id = opts.pad_id.unwrap_or(0);
        let (padded, padded_logits) =
            rounded_or_own(columns, t, |c| forward(model, &batch, c, pad_id))
                .map_err(|e| e.at_batch(&path, line))?;
        let forwarded = timed.then(|| CudaEvent::record_timed(self.device_index));
        let (losses, finite) = queue_losses(&padded_logits, &padded.input_ids, t, &path, line)?;
        let probe = if want_rows {
            // The probe sees the batch's own columns: views into the rounded tensors.
            let tensors = padded.narrow(t).map_err(in_batch)?;
            let logits = padded_logits.f_narrow(1, 0, t as i64).map_err(in_batch)?;
            probe_work(model, &tensors, &logits, &batch, opts, &path)?
        } else {
            ProbeWork::None
        };
        drop(padded_logits);
        let to_host = |t: &Tensor| {
            t.f_flatten(0, -1)
                .and_then(|t| t.f_to_device_(Device::Cpu, t.kind(), true, false))
                .map_err(in_batch)
        };
        let losses = to_host(&losses)?;
        let finite = to_host(&finite)?;
        let done = if timed {
            CudaEvent::record_timed(self.device_index)
        } else {
            CudaEvent::record(self.device_index)
        };
        Ok(Queued::InFlight(
            InFlight {
                batch,
                losses,
                finite,
                done,
                marks: start.flatten().zip(forwarded.flatten()),
            },
            probe,
        ))
    }

    /// The columns `batch` runs with (`rounded_columns`, unless `MASKAUDIT_SHAPE_BUCKETS=0`).
    fn columns(&self, model: &dyn LoadedModel, batch: &Batch) -> usize {
        if self.shape_buckets {
            rounded_columns(batch, model.record())
        } else {
            batch.seq_len
        }
    }

    pub(super) fn read(
        &mut self,
        flight: InFlight,
        model: &dyn LoadedModel,
        totals: &mut LossTotals,
        run: &mut RunState,
        opts: &CheckOptions,
    ) -> Result<()> {
        match &flight.done {
            Some(event) => event.wait().map_err(anyhow::Error::msg)?,
            None => tch::Cuda::synchronize(self.device_index as i64),
        }
        let losses = Vec::<f32>::try_from(&flight.losses)?;
        if !bool::try_from(&flight.finite)? {
            return Err(ModelError::NonFinite {
                path: model.path().to_string(),
                line: flight.batch.lines.first().copied().unwrap_or(0),
            }
            .into());
        }
        let batch = &flight.batch;
        run.observe(batch, &losses);
        totals.add_batch(
            &losses,
            &batch.target_mask(),
            &batch.padding_target_mask(),
            batch.rows,
        );
        run.keep_rows(batch, &losses, None, opts);
        if let Some(times) = &mut self.times {
            times.add(flight.marks, flight.done);
        }
        Ok(())
    }
}

/// `run` at the rounded `columns`; where the GPU lacks the memory for their extra logits, at
/// the batch's own `seq_len`, as without rounding.
fn rounded_or_own<T>(
    columns: usize,
    seq_len: usize,
    run: impl Fn(usize) -> Result<T, ModelError>,
) -> Result<T, ModelError> {
    match run(columns) {
        Err(e) if columns > seq_len && consistency::is_out_of_memory(&e.to_string()) => {
            run(seq_len)
        }
        done => done,
    }
}

/// The batch's tensors extended to `columns`, and the forward's logits `[B, columns, V]`.
fn forward(
    model: &dyn LoadedModel,
    batch: &Batch,
    columns: usize,
    pad_id: i64,
) -> Result<(BatchTensors, Tensor), ModelError> {
    let tensors = BatchTensors::with_columns(batch, model.device(), columns, pad_id)?;
    let logits = model.logits_at(
        &tensors.input_ids,
        &tensors.attention_mask,
        &tensors.position_ids,
    )?;
    Ok((tensors, logits))
}

/// The batch's per-token losses and a flag saying whether all were finite, queued on the
/// device (the fused kernel or libtorch's chunks); logits the flat path does not take
/// (`loss::takes_flat_path`) take the synchronous one.
fn queue_losses(
    logits: &Tensor,
    input_ids: &Tensor,
    seq_len: usize,
    path: &str,
    line: usize,
) -> Result<(Tensor, Tensor), ModelError> {
    let in_batch = |e: tch::TchError| ModelError::in_batch(path, line, &e);
    if maskaudit_torch::loss::takes_flat_path(logits) {
        let q = maskaudit_torch::loss::queue_flat_token_losses_of(
            logits,
            input_ids,
            maskaudit_torch::loss::CUDA_CHUNK_ELEMENTS,
            seq_len as i64,
        )
        .map_err(in_batch)?;
        return Ok((q.losses, q.finite));
    }
    // The synchronous path knows the finiteness already; it takes the batch's own columns.
    let t = seq_len as i64;
    let logits = logits.f_narrow(1, 0, t).map_err(in_batch)?;
    let input_ids = input_ids.f_narrow(1, 0, t).map_err(in_batch)?;
    let losses = maskaudit_torch::loss::batch::token_losses(&logits, &input_ids, path, line)?;
    let finite = Tensor::f_from_slice(&[true]).map_err(in_batch)?;
    Ok((losses, finite))
}

/// Memory running out in the probe's own tensor work (its model calls are handled in
/// `model::consistency`) leaves it unchecked rather than failing the run: beside the batches it
/// shares the GPU's memory with the next one.
fn out_of_memory(model: &dyn LoadedModel, e: anyhow::Error) -> Result<Consistency> {
    let text = model::torch_message(&e.to_string());
    if !consistency::is_out_of_memory(&text) {
        return Err(e);
    }
    Ok(Consistency::not_checked(
        model::logit_tolerance(model.run_kind()),
        format!("the probe ran out of memory beside the batches: {text}"),
    ))
}

/// The probe's rows of this batch, or, when no row has a real token, what the probe says of
/// that (without a model call).
fn probe_work(
    model: &dyn LoadedModel,
    tensors: &BatchTensors,
    logits: &Tensor,
    batch: &Batch,
    opts: &CheckOptions,
    path: &str,
) -> Result<ProbeWork, ModelError> {
    let line = batch.lines.first().copied().unwrap_or(0);
    let lengths = batch.probe_lengths();
    let copied = ProbeRows::copy(
        &tensors.input_ids,
        &tensors.attention_mask,
        logits,
        &lengths,
    )
    .map_err(|e| ModelError::in_batch(path, line, &e))?;
    Ok(match copied {
        Some(rows) => ProbeWork::Rows(rows),
        None => ProbeWork::NotRun(consistency::probe(
            model,
            &tensors.input_ids,
            &tensors.attention_mask,
            logits,
            &lengths,
            opts.pad_id.unwrap_or(0),
            probe_padding(model),
        )?),
    })
}

/// The consistency probe's part in a queued batch.
pub(super) enum ProbeWork {
    None,
    /// The rows to probe, on the probe's thread.
    Rows(ProbeRows),
    /// No row had a real token: the probe's report of that (it runs on a later batch).
    NotRun(Consistency),
}

pub(super) enum Queued {
    InFlight(InFlight, ProbeWork),
    /// One-token rows: no next-token position, nothing to run.
    Empty(Batch),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rounded_shape_without_memory_runs_at_the_batch_length() {
        let oom = || ModelError::Torch("CUDA out of memory. Tried to allocate 2.00 GiB".into());
        let fits_up_to = |limit: usize| move |c: usize| if c <= limit { Ok(c) } else { Err(oom()) };
        assert_eq!(rounded_or_own(2048, 1934, fits_up_to(4096)).unwrap(), 2048);
        assert_eq!(rounded_or_own(2048, 1934, fits_up_to(2000)).unwrap(), 1934);
        // Without rounding, or short of memory even at its own length: the error stands.
        assert!(rounded_or_own(1934, 1934, fits_up_to(1000)).is_err());
        assert!(rounded_or_own(2048, 1934, fits_up_to(1000)).is_err());
        // Another error is not retried.
        let calls = std::cell::Cell::new(0);
        let failed = rounded_or_own(2048, 1934, |_| -> Result<usize, ModelError> {
            calls.set(calls.get() + 1);
            Err(ModelError::Torch("shape mismatch".into()))
        });
        assert!(failed.is_err());
        assert_eq!(calls.get(), 1);
    }
}
