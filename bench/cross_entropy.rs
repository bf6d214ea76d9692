//! The CPU cross-entropy pass alone, against one plain read of the same logits: how far the
//! fused kernel (`loss::token_losses`) is from the memory's speed on this machine
//! (docs/performance.md). 13 batches of random `[8, 128, 32000]` f32 logits, the `compute`
//! workload's shape, 1.7 GB in all, so every pass reads from memory, not cache.
//!
//! ```sh
//! cargo build --release --example cross_entropy
//! target/release/examples/cross_entropy [ROUNDS]
//! ```

use std::time::Instant;

use tch::{Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()?
        .unwrap_or(5);
    // As `maskaudit check` does (src/settings.rs): huge pages under libtorch's large buffers.
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    maskaudit_torch::model::configure_libtorch();
    let _no_grad = tch::no_grad_guard();
    tch::manual_seed(1);
    let batches: Vec<(Tensor, Tensor)> = (0..13)
        .map(|_| {
            (
                Tensor::randn([8, 128, 32000], (Kind::Float, tch::Device::Cpu)),
                Tensor::randint(32000, [8, 128], (Kind::Int64, tch::Device::Cpu)),
            )
        })
        .collect();
    for round in 1..=rounds {
        let start = Instant::now();
        for (logits, ids) in &batches {
            maskaudit_torch::loss::token_losses(
                logits,
                ids,
                maskaudit_torch::loss::CHUNK_ELEMENTS,
            )?;
        }
        let cross_entropy = start.elapsed().as_secs_f64();
        let start = Instant::now();
        for (logits, _) in &batches {
            let _ = logits.amax([-1i64].as_slice(), false);
        }
        let read = start.elapsed().as_secs_f64();
        println!(
            "round {round}: cross-entropy {cross_entropy:.4} s, one read (amax) {read:.4} s, {} batches",
            batches.len()
        );
    }
    Ok(())
}
