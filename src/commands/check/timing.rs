//! `MASKAUDIT_TIMING=1`: where a run's wall time goes.

use std::io::Write;

use tch::{Device, Kind};

use crate::model::LoadedModel;

/// `MASKAUDIT_TIMING=1`: the wall time of each phase of a run on stderr (for measuring; on a
/// GPU the device is synchronised at each mark).
pub(super) struct Timing {
    pub(super) on: bool,
    pub(super) device: Device,
    pub(super) last: std::time::Instant,
}

impl Timing {
    pub(super) fn new(on: bool) -> Self {
        Self {
            on,
            device: Device::Cpu,
            last: std::time::Instant::now(),
        }
    }

    pub(super) fn mark(&mut self, what: &str) {
        if !self.on {
            return;
        }
        if let Device::Cuda(n) = self.device {
            tch::Cuda::synchronize(n as i64);
        }
        let now = std::time::Instant::now();
        let _ = writeln!(
            std::io::stderr(),
            "maskaudit timing: {what}: {:.3} s",
            (now - self.last).as_secs_f64()
        );
        self.last = now;
    }

    /// A measurement of its own, on its line.
    pub(super) fn note(&self, text: &str) {
        if self.on {
            let _ = writeln!(std::io::stderr(), "maskaudit timing: {text}");
        }
    }

    /// Which cross-entropy a GPU run took, and how bf16 logits were upcast on libtorch's path.
    pub(super) fn cross_entropy(&self, model: &dyn LoadedModel) {
        if self.on && model.device().is_cuda() {
            let _ = writeln!(
                std::io::stderr(),
                "maskaudit timing: cross-entropy {}; fused kernels: {}",
                maskaudit_torch::loss::cuda_ce::cross_entropy_used().unwrap_or("none"),
                maskaudit_torch::loss::cuda_ce::kernels_origin().unwrap_or("none loaded")
            );
        }
        if self.on
            && model.run_kind() == Kind::BFloat16
            && model.device().is_cuda()
            && maskaudit_torch::loss::cuda_ce::cross_entropy_used() != Some("fused-cuda")
        {
            // A diagnostic on request: straight to stderr.
            let _ = writeln!(
                std::io::stderr(),
                "maskaudit timing: bf16 logits upcast {}",
                if maskaudit_torch::loss::bf16_upcast_in_kernel() {
                    "inside the log-softmax kernel"
                } else {
                    "by a copy (the kernel refused half_to_float)"
                }
            );
        }
    }
}
