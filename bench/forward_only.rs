//! The floor for `bench/`: the model's forward pass alone, over exactly the batches that
//! `maskaudit check` runs, loaded and called the way maskaudit does it (same libtorch, same
//! JIT settings, same threads), with no cross-entropy, no aggregation and no reading in the
//! timed part.
//!
//! The rows are read and batched first; that time is printed as `prepare_s` so the harness can
//! take it off the process's wall time. What is left is the process start, libtorch's load, the
//! model's load and the forward passes: what any program that runs this model over these
//! batches pays.
//!
//! ```sh
//! cargo build --release --example forward_only
//! target/release/examples/forward_only MODEL DATA BATCH_SIZE PAD_ID [cpu|cuda]
//! ```
//! Prints one JSON line: `{"prepare_s": …, "forward_s": …, "batches": …, "tokens": …,
//! "threads": …}`, `threads` being libtorch's intra-op threads (maskaudit's, too).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use maskaudit::batch::Batcher;
use maskaudit::check::BatchTensors;
use maskaudit::data::{FieldNames, RowSource};
use maskaudit::model::{DeviceChoice, LanguageModel, TorchScriptLm};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        anyhow::bail!("usage: forward_only MODEL DATA BATCH_SIZE PAD_ID [cpu|cuda]");
    }
    let batch_size: usize = args[3].parse().context("BATCH_SIZE")?;
    let pad_id: i64 = args[4].parse().context("PAD_ID")?;
    let device: DeviceChoice = args
        .get(5)
        .map(String::as_str)
        .unwrap_or("cpu")
        .parse()
        .map_err(anyhow::Error::msg)?;

    // As `maskaudit check` does.
    maskaudit::model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();
    let device = device.resolve()?;

    let start = Instant::now();
    let mut batches = vec![];
    let mut batcher = Batcher::new(batch_size, Some(pad_id), args[2].clone());
    for row in RowSource::open(Path::new(&args[2]), FieldNames::default())? {
        if let Some(batch) = batcher.push(row?)? {
            batches.push(batch);
        }
    }
    batches.extend(batcher.finish()?);
    let tensors = batches
        .iter()
        .map(|b| BatchTensors::new(b, tch::Device::Cpu))
        .collect::<Result<Vec<_>, _>>()?;
    let prepare_s = start.elapsed().as_secs_f64();

    let model = TorchScriptLm::load(Path::new(&args[1]), device, &Default::default())?;
    let start = Instant::now();
    for t in &tensors {
        // The upload is part of the floor: maskaudit has to make it too.
        let ids = t.input_ids.to_device(device);
        let mask = t.attention_mask.to_device(device);
        let logits = model.logits(&ids, &mask)?;
        drop(logits);
    }
    if let tch::Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
    let forward_s = start.elapsed().as_secs_f64();
    let tokens: usize = batches.iter().map(|b| b.rows * b.seq_len).sum();
    let report = serde_json::json!({
        "prepare_s": prepare_s,
        "forward_s": forward_s,
        "batches": batches.len(),
        "tokens": tokens,
        "threads": tch::get_num_threads(),
    });
    println!("{report}");
    Ok(())
}
