//! maskaudit's libtorch side: the model behind [`model::LanguageModel`], per-token
//! cross-entropy (fused CPU kernel, chunked libtorch, the fused CUDA kernel), the user's loss,
//! and the gradient weights recovered from its gradient. The arithmetic on what these compute
//! is `maskaudit_core`'s.

pub mod loss;
pub mod model;

// The core's modules under the names this crate has always used for them.
use maskaudit_core::{data, findings, sys};
