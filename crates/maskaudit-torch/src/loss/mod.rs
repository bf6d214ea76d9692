//! Losses computed with libtorch: per-token cross-entropy (libtorch's kernels, a fused CPU
//! kernel, a fused CUDA kernel), a batch through the model, the user's own loss function, and
//! its gradient weights. The arithmetic on them is `maskaudit_core::loss`'s.

pub mod batch;
pub mod cuda_ce;
mod kernel_cache;
pub mod policy;
mod token;
pub mod user;
pub mod weights;

// The core's loss arithmetic, under the paths this crate's modules name it by.
pub(crate) use maskaudit_core::loss::{aggregate, diagnosis};

pub use token::*;
