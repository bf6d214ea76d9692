//! The commands: each reads its input, drives the layers below and returns a report. Nothing
//! here is imported by the layers below.

pub mod check;
pub mod explain;
pub mod lint;
