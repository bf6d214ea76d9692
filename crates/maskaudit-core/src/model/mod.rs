//! What the report says of a model: its forward's arguments and output form, and the
//! consistency probe's result. Loading and running a model needs libtorch
//! (`maskaudit_torch::model`).

pub mod consistency;
mod forward;

pub use forward::*;
