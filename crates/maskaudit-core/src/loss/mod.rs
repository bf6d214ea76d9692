//! The loss arithmetic, on per-token losses already computed: aggregates under each
//! normalisation, the formulas a user's loss may compute and their diagnosis, the gradient
//! weight map's fit, the training step's weighting, and what the report says of the user's
//! loss. Computing the per-token losses is `maskaudit_torch::loss`'s.

pub mod aggregate;
pub mod diagnosis;
pub mod policy_aggregation;
pub mod ranks;
pub mod rollout_batch;
pub mod steps;
pub mod user;
pub mod weights;
