//! The command line: its arguments (`args`, clap), resolved with the environment into
//! settings (`settings`), their running (`run`), and the files a run writes (`outputs`).

mod args;
mod outputs;
pub mod run;
pub mod settings;

pub use args::*;
