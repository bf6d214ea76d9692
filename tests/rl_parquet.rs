//! Rollouts and preference pairs from Parquet (fixtures/rl/*.parquet, the JSONL files' rows
//! written by pyarrow in fixtures/generate_rl.py): audited exactly as their JSONL.

mod common;

use common::*;
use serde_json::Value;

const PREFERENCE: &str = "chosen_logprobs,rejected_logprobs,chosen_mask,rejected_mask,ref_chosen_logprobs,ref_rejected_logprobs";

fn both(data: &str, loss: &str, args: &str) -> [(Value, Output); 2] {
    let loss = fixture(&format!("rl/losses/{loss}.pt"));
    ["jsonl", "parquet"]
        .map(|ext| check_rl(&fixture(&format!("rl/{data}.{ext}")), &loss, args, &[]))
}

#[test]
fn parquet_rollouts_and_pairs_audit_as_their_jsonl() {
    for (data, loss, args) in [
        ("rollouts", "seq_mean_token_mean", POLICY),
        ("rollouts", "dr_grpo", POLICY),
        // null old log-probs at masked slots: NaN from Parquet nulls as from JSON's.
        ("tool_rollouts", "nan_times_zero", POLICY),
        ("tool_rollouts", "token_mean", POLICY),
        ("pairs", "ipo_mean", PREFERENCE),
        ("pairs", "dpo_sigmoid_sum", PREFERENCE),
    ] {
        let [(jsonl, a), (parquet, b)] = both(data, loss, args);
        assert_eq!(a.code, b.code, "{data} {loss}: {}", b.stdout);
        assert_eq!(jsonl["user_loss"], parquet["user_loss"], "{data} {loss}");
        assert_eq!(jsonl["findings"], parquet["findings"], "{data} {loss}");
    }
}

#[test]
fn a_parquet_file_without_the_fields_stops_with_one_line() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        &fixture("rl/pairs.parquet"),
        "--loss",
        &fixture("rl/losses/token_mean.pt"),
        "--loss-args",
        POLICY,
    ]);
    assert_eq!(out.code, 2, "{out:?}");
    let line = out.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("rl/pairs.parquet:1: input_ids"), "{line}");
}
