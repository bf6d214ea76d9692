//! A plain audit on a GPU: one batch in flight while the host reads the previous one's losses.

use anyhow::Result;
use tch::{Device, Kind, Tensor};

use super::batches::{check_length_limit, RunState};
use super::CheckOptions;
use crate::data::batch::Batch;
use crate::loss::aggregate::LossTotals;
use crate::loss::batch::BatchTensors;
use crate::model::{self, CudaEvent, LoadedModel, ModelError};

/// One batch in flight on a GPU: its losses are computed and copied (non-blocking, into pinned
/// host memory) on the device's queue, and an event marks the end of that copy. The host reads
/// them only after it has queued the next batch, so the GPU goes from one batch's work to the
/// next without waiting for the host to read losses, aggregate, take the next batch and upload
/// it. Used for a plain audit on CUDA (no user loss, no step simulation, which need each batch's
/// logits or results in turn), after the batch that ran the consistency probe; the environment
/// variable `MASKAUDIT_OVERLAP=0` turns it off (for measuring it).
pub(super) struct Overlap {
    pub(super) active: bool,
    pub(super) device_index: usize,
    pub(super) in_flight: Option<InFlight>,
}

/// A batch whose losses are on their way to the host.
pub(super) struct InFlight {
    pub(super) batch: Batch,
    /// f32 `[B·(T-1)]` and a bool scalar, in host memory once `done` has completed.
    pub(super) losses: Tensor,
    pub(super) finite: Tensor,
    /// `None` when CUDA events are not at hand: reading `losses` then waits for the device.
    pub(super) done: Option<CudaEvent>,
}

impl Overlap {
    pub(super) fn new(device: Device, opts: &CheckOptions) -> Self {
        let device_index = match device {
            Device::Cuda(n) => Some(n),
            _ => None,
        };
        let off = std::env::var_os("MASKAUDIT_OVERLAP").is_some_and(|v| v == "0");
        Self {
            active: device_index.is_some() && opts.loss.is_none() && opts.steps.is_none() && !off,
            device_index: device_index.unwrap_or(0),
            in_flight: None,
        }
    }

    /// Queues `batch` on the device, then reads the batch queued before it.
    pub(super) fn push(
        &mut self,
        model: &dyn LoadedModel,
        batch: Batch,
        totals: &mut LossTotals,
        run: &mut RunState,
        opts: &CheckOptions,
    ) -> Result<()> {
        let queued = self.queue(model, batch, run, opts);
        // Errors in file order: the batch before this one first.
        let previous = self.in_flight.take();
        if let Some(previous) = previous {
            self.read(previous, model, totals, run)?;
        }
        match queued? {
            Queued::InFlight(next) => self.in_flight = Some(next),
            Queued::Empty(batch) => {
                totals.add_batch(&[], &[], batch.rows);
            }
        }
        Ok(())
    }

    /// Reads the last batch in flight.
    pub(super) fn finish(
        &mut self,
        model: &dyn LoadedModel,
        totals: &mut LossTotals,
        run: &mut RunState,
    ) -> Result<()> {
        match self.in_flight.take() {
            Some(last) => self.read(last, model, totals, run),
            None => Ok(()),
        }
    }

    pub(super) fn queue(
        &self,
        model: &dyn LoadedModel,
        batch: Batch,
        run: &RunState,
        opts: &CheckOptions,
    ) -> Result<Queued> {
        let line = batch.lines.first().copied().unwrap_or(0);
        if batch.seq_len < 2 {
            return Ok(Queued::Empty(batch));
        }
        check_length_limit(model, &batch, run.unit, line)?;
        let path = model::path_string(&opts.model);
        let tensors = BatchTensors::new(&batch, model.device())?;
        let in_batch = |e: tch::TchError| ModelError::Forward {
            path: path.clone(),
            line,
            message: model::torch_message(&e.to_string()),
        };
        let logits = model
            .logits(&tensors.input_ids, &tensors.attention_mask)
            .map_err(|e| match e {
                ModelError::Torch(message) => ModelError::Forward {
                    path: path.clone(),
                    line,
                    message,
                },
                other => other,
            })?;
        let (losses, finite) = if logits.is_contiguous()
            && matches!(logits.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
        {
            let q = crate::loss::queue_flat_token_losses(
                &logits,
                &tensors.input_ids,
                crate::loss::CUDA_CHUNK_ELEMENTS,
            )
            .map_err(in_batch)?;
            (q.losses, q.finite)
        } else {
            // Other logits take the synchronous path; the finiteness is known already.
            let losses =
                crate::loss::token_losses(&logits, &tensors.input_ids, crate::loss::CHUNK_ELEMENTS)
                    .map_err(in_batch)?
                    .ok_or(ModelError::NonFinite {
                        path: path.clone(),
                        line,
                    })?;
            let finite = Tensor::f_from_slice(&[true]).map_err(in_batch)?;
            (losses, finite)
        };
        drop(logits);
        let to_host = |t: &Tensor| {
            t.f_flatten(0, -1)
                .and_then(|t| t.f_to_device_(Device::Cpu, t.kind(), true, false))
                .map_err(in_batch)
        };
        let losses = to_host(&losses)?;
        let finite = to_host(&finite)?;
        let done = CudaEvent::record(self.device_index);
        Ok(Queued::InFlight(InFlight {
            batch,
            losses,
            finite,
            done,
        }))
    }

    pub(super) fn read(
        &self,
        flight: InFlight,
        model: &dyn LoadedModel,
        totals: &mut LossTotals,
        run: &mut RunState,
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
        Self::account(&flight.batch, &losses, totals, run);
        Ok(())
    }

    pub(super) fn account(
        batch: &Batch,
        losses: &[f32],
        totals: &mut LossTotals,
        run: &mut RunState,
    ) {
        run.observe(batch, losses);
        totals.add_batch(losses, &batch.target_mask(), batch.rows);
    }
}

pub(super) enum Queued {
    InFlight(InFlight),
    /// One-token rows: no next-token position, nothing to run.
    Empty(Batch),
}
