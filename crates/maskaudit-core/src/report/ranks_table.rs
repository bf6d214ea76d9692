//! The table report's lines for a run captured on every rank (`check --captured-losses`).

use std::io::Write;

use crate::loss::ranks::{CountKind, RanksReport};

/// Each rank's count and token mean, the trainer's formula across the ranks, what
/// `num_items_in_batch` counted, and the model's cross-check.
pub fn write<W: Write>(out: &mut W, r: &RanksReport) -> std::io::Result<()> {
    let ranks: Vec<String> = r
        .ranks
        .iter()
        .map(|k| {
            let mean = k
                .token_mean
                .map_or_else(|| "none".to_string(), |m| format!("{m:.6}"));
            format!("rank {}: {} trained, token mean {mean}", k.rank, k.trained)
        })
        .collect();
    writeln!(
        out,
        "  ranks  {} ranks, up to {} micro-batches a rank and step; {}",
        r.world_size,
        r.accumulation,
        ranks.join("; ")
    )?;
    let formula = r.formula.map_or(
        "no formula fits the trainer's losses (or none was recorded)",
        |f| f.describe(),
    );
    writeln!(
        out,
        "         the trainer's loss across the ranks: {formula}"
    )?;
    let counted: Vec<CountKind> = r
        .steps
        .iter()
        .flat_map(|s| s.ranks.iter().filter_map(|k| k.counted))
        .collect();
    if !counted.is_empty() {
        let all = |kind| counted.iter().all(|&c| c == kind);
        let what = if all(CountKind::Global) {
            "the step's count over every rank"
        } else if all(CountKind::Rank) {
            "each rank's own count"
        } else {
            "not always the step's count over every rank, nor the rank's own"
        };
        writeln!(out, "         num_items_in_batch: {what}")?;
    }
    if let Some(c) = &r.cross_check {
        writeln!(
            out,
            "         the model's losses: {} batches compared ({} skipped), at most {:.2e} from the recorded ones, {} positions beyond the tolerance",
            c.batches, c.skipped, c.max_difference, c.positions_off
        )?;
    }
    Ok(())
}
