//! Losses: per-token cross-entropy (libtorch's kernels and a fused CPU kernel), their
//! aggregates, the normalisations a scalar loss can have (diagnosis), the user's own loss
//! function, its gradient weights, and the training step's weighting.
//!
//! Below the commands and the report; above `model` (the user's loss is a TorchScript module
//! too) and `data`.

pub mod aggregate;
pub mod batch;
pub mod cuda_ce;
pub mod diagnosis;
pub mod kernel_cache;
pub mod policy;
pub mod policy_aggregation;
pub mod ranks;
pub mod rollout_batch;
pub mod steps;
pub mod token;
pub mod user;
pub mod weights;

pub use token::*;
