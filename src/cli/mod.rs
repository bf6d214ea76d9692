//! The command line: its arguments (`args`, clap), their running (`run`) and the files a run
//! writes (`outputs`).

mod args;
pub mod outputs;
pub mod run;

pub use args::*;
