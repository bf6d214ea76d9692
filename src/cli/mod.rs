//! The command line: its arguments (`args`, clap) and their running (`run`).

mod args;
pub mod run;

pub use args::*;
