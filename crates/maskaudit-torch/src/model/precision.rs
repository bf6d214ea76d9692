//! The dtype a run computes the forward in (`--dtype`), and TF32 for float32 matrix products on
//! CUDA (`--tf32`).

use std::ffi::c_void;

use tch::{Device, Kind};

/// `--dtype`: the dtype the model's parameters are converted to before the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DtypeChoice {
    /// The model's own: the exporter record's `dtype`, else its parameters'.
    #[default]
    Auto,
    Float32,
    BFloat16,
    Float16,
}

impl std::str::FromStr for DtypeChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "float32" | "fp32" | "f32" => Ok(Self::Float32),
            "bfloat16" | "bf16" => Ok(Self::BFloat16),
            "float16" | "fp16" | "f16" | "half" => Ok(Self::Float16),
            _ => Err(format!(
                "'{s}' is not one of auto, float32, bfloat16, float16"
            )),
        }
    }
}

impl DtypeChoice {
    /// The kind asked for; `None` for `auto`.
    pub fn kind(self) -> Option<Kind> {
        match self {
            DtypeChoice::Auto => None,
            DtypeChoice::Float32 => Some(Kind::Float),
            DtypeChoice::BFloat16 => Some(Kind::BFloat16),
            DtypeChoice::Float16 => Some(Kind::Half),
        }
    }
}

/// The kind for a PyTorch dtype name as the exporter records it (`float32`, `torch.bfloat16`,
/// `bf16`, …); `None` for anything else.
pub fn kind_of_name(name: &str) -> Option<Kind> {
    match name.trim().trim_start_matches("torch.") {
        "float32" | "float" | "fp32" => Some(Kind::Float),
        "bfloat16" | "bf16" => Some(Kind::BFloat16),
        "float16" | "half" | "fp16" => Some(Kind::Half),
        "float64" | "double" => Some(Kind::Double),
        _ => None,
    }
}

/// `--tf32`: whether float32 matrix products on CUDA may use TF32 (10-bit mantissa inputs,
/// float32 accumulation) on the tensor cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tf32 {
    #[default]
    On,
    Off,
}

impl std::str::FromStr for Tf32 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" | "true" | "1" => Ok(Self::On),
            "off" | "false" | "0" => Ok(Self::Off),
            _ => Err(format!("'{s}' is not one of on, off")),
        }
    }
}

/// Sets libtorch's process-wide TF32 switch for cuBLAS float32 matrix products
/// (`torch.backends.cuda.matmul.allow_tf32` in Python) for a run on `device` in `run_kind`,
/// and returns whether TF32 is in effect for its matrix products: only on CUDA, only in
/// float32, and only when `tf32` is on. Elsewhere the switch is set off, and the answer is
/// false (on the CPU libtorch's float32 matrix products are IEEE whatever it says).
pub fn apply_tf32(tf32: Tf32, device: Device, run_kind: Kind) -> bool {
    let want = tf32 == Tf32::On && device.is_cuda() && run_kind == Kind::Float;
    set_allow_tf32_cublas(want);
    allow_tf32_cublas()
}

// tch has no binding for the switch, so libtorch's own C++ methods are called by their
// (Itanium ABI) names: `at::globalContext()` returns the process's `at::Context&`, and a
// non-virtual member function takes `this` as its first argument. These are the calls Python's
// `torch.backends.cuda.matmul.allow_tf32 = …` makes. The symbols are in libtorch_cpu.so, which
// the binary links, so a libtorch without them fails at link time, not at run time; tch pins
// the libtorch version (2.11.0). Neither method throws for these arguments.
extern "C" {
    #[link_name = "_ZN2at13globalContextEv"]
    fn at_global_context() -> *mut c_void;
    #[link_name = "_ZN2at7Context18setAllowTF32CuBLASEb"]
    fn at_context_set_allow_tf32_cublas(context: *mut c_void, allow: bool);
    #[link_name = "_ZNK2at7Context15allowTF32CuBLASEv"]
    fn at_context_allow_tf32_cublas(context: *const c_void) -> bool;
}

/// `at::globalContext().setAllowTF32CuBLAS(allow)`.
pub fn set_allow_tf32_cublas(allow: bool) {
    // SAFETY: see the extern block; the context lives as long as the process.
    unsafe { at_context_set_allow_tf32_cublas(at_global_context(), allow) }
}

/// `at::globalContext().allowTF32CuBLAS()`.
pub fn allow_tf32_cublas() -> bool {
    // SAFETY: as for `set_allow_tf32_cublas`.
    unsafe { at_context_allow_tf32_cublas(at_global_context()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(DtypeChoice::Auto));
        assert_eq!("bf16".parse(), Ok(DtypeChoice::BFloat16));
        assert_eq!(
            "float16".parse::<DtypeChoice>().unwrap().kind(),
            Some(Kind::Half)
        );
        assert!("int8".parse::<DtypeChoice>().is_err());
        assert_eq!("off".parse(), Ok(Tf32::Off));
        assert!("maybe".parse::<Tf32>().is_err());
        assert_eq!(kind_of_name("torch.bfloat16"), Some(Kind::BFloat16));
        assert_eq!(kind_of_name("float32"), Some(Kind::Float));
        assert_eq!(kind_of_name("int8"), None);
    }

    /// The switch round-trips through libtorch (it exists on a CPU-only run too), and a CPU run
    /// reports TF32 off whatever was asked.
    #[test]
    fn the_tf32_switch_round_trips() {
        set_allow_tf32_cublas(true);
        assert!(allow_tf32_cublas());
        set_allow_tf32_cublas(false);
        assert!(!allow_tf32_cublas());
        assert!(!apply_tf32(Tf32::On, Device::Cpu, Kind::Float));
    }
}
