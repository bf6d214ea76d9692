//! `MASKAUDIT_TIMING=1`: where a run's wall time goes.

use std::io::Write;

use tch::Device;

/// `MASKAUDIT_TIMING=1`: the wall time of each phase of a run on stderr (for measuring; on a
/// GPU the device is synchronised at each mark).
pub(super) struct Timing {
    pub(super) on: bool,
    pub(super) device: Device,
    pub(super) last: std::time::Instant,
}

impl Timing {
    pub(super) fn from_env() -> Self {
        Self {
            on: std::env::var_os("MASKAUDIT_TIMING").is_some_and(|v| v == "1"),
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
}
