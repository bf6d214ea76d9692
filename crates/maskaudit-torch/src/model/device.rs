//! Which device a run uses, and loading libtorch's CUDA backend only when it may be used.

use tch::Device;

use super::ModelError;

/// `--device`: cpu, cuda, cuda:N, or auto.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("'{s}' is not one of cpu, cuda, cuda:N, auto")),
        }
    }
}

impl DeviceChoice {
    pub fn resolve(self) -> Result<Device, ModelError> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => Ok(
                if cuda_driver_present() && load_cuda_backend().is_ok() && tch::Cuda::is_available()
                {
                    Device::Cuda(0)
                } else {
                    Device::Cpu
                },
            ),
            DeviceChoice::Cuda(n) => {
                let name = if n == 0 {
                    "cuda".into()
                } else {
                    format!("cuda:{n}")
                };
                if let Err(message) = load_cuda_backend() {
                    return Err(ModelError::Device {
                        device: name,
                        message,
                    });
                }
                let count = tch::Cuda::device_count();
                if count == 0 {
                    Err(ModelError::Device {
                        device: name,
                        message: "CUDA is not available (no GPU, or libtorch without CUDA)".into(),
                    })
                } else if n as i64 >= count {
                    Err(ModelError::Device {
                        device: name,
                        message: format!("only {count} CUDA device(s) are visible"),
                    })
                } else {
                    Ok(Device::Cuda(n))
                }
            }
        }
    }
}

/// libtorch keeps its CUDA kernels in `libtorch_cuda.so`; with the CUDA, cuBLAS, cuDNN and NCCL
/// libraries it needs, that is gigabytes of code whose loading and static initialisers cost
/// every run time and RSS, CUDA or not (docs/performance.md, "Figures behind the code"). So
/// the binary does not
/// link it (build.rs) and it is loaded here, once, when a run may use CUDA; its initialisers
/// then register the CUDA backend with libtorch. It must be loaded before anything asks
/// libtorch about CUDA: libtorch caches the answer. The name is looked up the way the linker's
/// would be (LD_LIBRARY_PATH, then the binary's runpath).
pub fn load_cuda_backend() -> Result<(), String> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            dlopen_global("libtorch_cuda.so")
                .map_err(|e| format!("CUDA is not available: libtorch_cuda.so: {e}"))
        })
        .clone()
}

/// Whether the NVIDIA driver's library is installed: without it CUDA cannot be available, and
/// `--device auto` need not load the CUDA backend to find that out.
fn cuda_driver_present() -> bool {
    dlopen_global("libcuda.so.1").is_ok()
}

/// `dlopen(name, RTLD_NOW | RTLD_GLOBAL)`, never closed: libtorch keeps pointers into it.
fn dlopen_global(name: &str) -> Result<(), String> {
    crate::sys::Library::open_global(name).map(|_| ())
}

/// `cpu`, `cuda:0`, …
pub fn device_name(device: Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_choices_parse() {
        assert_eq!("auto".parse(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceChoice::Cuda(3)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn a_library_that_cannot_be_opened_is_named() {
        let err = dlopen_global("libmaskaudit-absent.so").unwrap_err();
        assert!(err.contains("libmaskaudit-absent.so"), "{err}");
    }
}
