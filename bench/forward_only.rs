//! The floor for `bench/`: the model's forward pass alone, over exactly the batches that
//! `maskaudit check` runs, loaded and called the way maskaudit does it (same libtorch, same
//! JIT settings, same threads), with no cross-entropy, no aggregation and no reading in the
//! timed part.
//!
//! The rows are read and batched first; that time is printed as `prepare_s` so the harness can
//! take it off the process's wall time. What is left is the process start, libtorch's load, the
//! device's start, the model's load and the forward passes: what any program that runs this
//! model over these batches pays. On CUDA the device is started before `prepare_s`'s clock
//! (`device_start_s`): the first pinned buffer would otherwise create the CUDA context inside
//! it, and the harness would take that off the floor too.
//!
//! ```sh
//! cargo build --release --example forward_only
//! target/release/examples/forward_only MODEL DATA BATCH_SIZE PAD_ID [cpu|cuda] [DTYPE] [TF32]
//! ```
//! DTYPE and TF32 are `check`'s `--dtype` (auto, float32, bfloat16, float16) and `--tf32`
//! (on, off), applied the same way. On CUDA the batches are held in pinned host memory and
//! uploaded with non-blocking copies, so nothing waits for the device until the end: the
//! floor is the forward passes back to back.
//! Prints one JSON line: `{"prepare_s": …, "device_start_s": …, "forward_s": …, "batches": …, "tokens": …,
//! "threads": …}`, `threads` being libtorch's intra-op threads (maskaudit's, too).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use maskaudit_core::data::batch::Batcher;
use maskaudit_core::data::{FieldNames, RowSource};
use maskaudit_torch::loss::batch::BatchTensors;
use maskaudit_torch::model::{
    apply_tf32, DeviceChoice, DtypeChoice, LanguageModel, LoadOptions, LoadedModel, Tf32,
    TorchScriptLm,
};

/// Long because it is the floor's whole measurement, read top to bottom: arguments, the
/// model loaded as maskaudit loads it, the rows batched first, then the timed forward loop.
fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 5 {
        anyhow::bail!(
            "usage: forward_only MODEL DATA BATCH_SIZE PAD_ID [cpu|cuda] [DTYPE] [on|off]"
        );
    }
    let batch_size: usize = args[3].parse().context("BATCH_SIZE")?;
    let pad_id: i64 = args[4].parse().context("PAD_ID")?;
    let device: DeviceChoice = args
        .get(5)
        .map(String::as_str)
        .unwrap_or("cpu")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let dtype: DtypeChoice = args
        .get(6)
        .map(String::as_str)
        .unwrap_or("auto")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let tf32: Tf32 = args
        .get(7)
        .map(String::as_str)
        .unwrap_or("on")
        .parse()
        .map_err(anyhow::Error::msg)?;

    // As `maskaudit check` does.
    // As `maskaudit check` does (src/settings.rs): huge pages under libtorch's large buffers.
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    maskaudit_torch::model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();
    let device = device.resolve()?;

    let start = Instant::now();
    if let tch::Device::Cuda(n) = device {
        // The context, which maskaudit makes before it reads anything.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Int64, device));
        tch::Cuda::synchronize(n as i64);
    }
    let device_start_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut batches = vec![];
    let mut batcher = Batcher::new(batch_size, Some(pad_id), args[2].clone());
    for row in RowSource::open(Path::new(&args[2]), FieldNames::default())? {
        if let Some(batch) = batcher.push(row?)? {
            batches.push(batch);
        }
    }
    batches.extend(batcher.finish()?);
    let pin = |t: tch::Tensor| {
        if device.is_cuda() {
            t.internal_pin_memory(device)
        } else {
            t
        }
    };
    let tensors = batches
        .iter()
        .map(|b| {
            BatchTensors::new(b, tch::Device::Cpu).map(|t| BatchTensors {
                input_ids: pin(t.input_ids),
                attention_mask: pin(t.attention_mask),
                position_ids: pin(t.position_ids),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prepare_s = start.elapsed().as_secs_f64();

    let options = LoadOptions {
        dtype: dtype.kind(),
        ..Default::default()
    };
    let model = TorchScriptLm::load(Path::new(&args[1]), device, &options)?;
    let tf32 = apply_tf32(tf32, device, model.run_kind());
    let start = Instant::now();
    for t in &tensors {
        // The upload is part of the floor: maskaudit has to make it too.
        let upload = |x: &tch::Tensor| x.to_device_(device, tch::Kind::Int64, true, false);
        let ids = upload(&t.input_ids);
        let mask = upload(&t.attention_mask);
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
        "device_start_s": device_start_s,
        "forward_s": forward_s,
        "batches": batches.len(),
        "tokens": tokens,
        "threads": tch::get_num_threads(),
        "run_dtype": model.run_dtype(),
        "tf32": tf32,
    });
    println!("{report}");
    Ok(())
}
