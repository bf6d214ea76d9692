//! trl's own GRPO and DPO losses (tests/export/rl_trl.py, `make hf-models`: trl 1.16's
//! `GRPOTrainer._compute_loss` and `DPOTrainer._compute_loss` traced, not re-typed) through the
//! real binary: each classified as its expected.json says, read from trl's code independently
//! of maskaudit. trl masks by multiplication (`per_token_loss * mask`), so the NaN probe fails
//! on its GRPO losses; on rollouts whose masked slots are finite, as trl computes them, that
//! is a warning and the run passes.

mod common;

use common::*;
use serde_json::Value;

const PREFERENCE: &str = "chosen_logprobs,rejected_logprobs,chosen_mask,rejected_mask,ref_chosen_logprobs,ref_rejected_logprobs";

fn dir() -> std::path::PathBuf {
    hf_models("rl-trl", "expected.json")
}

fn expected() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap()).unwrap()
}

fn check(data: &str, loss: &str, args: &str, extra: &[&str]) -> (Value, Output) {
    let path = |name: String| dir().join(name).display().to_string();
    check_rl(&path(data.into()), &path(format!("{loss}.pt")), args, extra)
}

/// (code, severity) of each finding.
fn findings(json: &Value) -> Vec<(String, String)> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap().to_string();
            (s("code"), s("severity"))
        })
        .collect()
}

#[test]
fn trls_grpo_loss_types_are_classified_as_trls_code_reads() {
    let expected = expected();
    let cases = expected["policy"].as_object().unwrap();
    // grpo, bnpo, dr_grpo, dapo at least: the four the issue names.
    for name in ["grpo_grpo", "grpo_bnpo", "grpo_dr_grpo", "grpo_dapo"] {
        assert!(
            cases.contains_key(name),
            "{name} missing from expected.json"
        );
    }
    for (name, want) in cases {
        let args = policy_loss_args(want);
        let (json, out) = check("rollouts.jsonl", name, &args, &[]);
        let user = &json["user_loss"];
        assert_eq!(
            user["aggregation"], want["aggregation"],
            "{name}: {}",
            out.stdout
        );
        let policy = &user["policy"];
        if let Some(c) = want["constant"].as_f64() {
            let got = policy["constant"].as_f64();
            assert!(got.is_some_and(|g| close(g, c)), "{name}: {policy}");
        }
        let scale = want["scale"].as_f64().unwrap();
        let got = policy["scale"].as_f64();
        assert!(got.is_some_and(|g| close(g, scale)), "{name}: {policy}");
        // trl multiplies by the mask: the probe's NaN gets through, the data's values do not.
        assert_eq!(policy["nan_probe"]["passed"], false, "{name}");
        assert_eq!(policy["data_pass"]["non_finite_line"], Value::Null);
        assert_eq!(
            findings(&json),
            [("policy-nan-through-mask".to_string(), "warning".to_string())],
            "{name}"
        );
        assert_eq!(out.code, 0, "{name}: {}", out.stdout);
    }
}

#[test]
fn trls_dpo_losses_sum_or_average_as_trls_code_reads() {
    let expected = expected();
    let cases = expected["preference"].as_object().unwrap();
    for name in ["dpo_sigmoid", "dpo_ipo"] {
        assert!(
            cases.contains_key(name),
            "{name} missing from expected.json"
        );
    }
    for (name, want) in cases {
        let (json, out) = check("pairs.jsonl", name, PREFERENCE, &[]);
        let policy = &json["user_loss"]["policy"];
        assert_eq!(
            policy["preference_logps"], want["preference_logps"],
            "{name}: {}",
            out.stdout
        );
        // The fused LM head zeroes masked positions by selection: nothing to flag.
        assert_eq!(findings(&json), [], "{name}");
        assert_eq!(out.code, 0, "{name}");
    }
}

#[test]
fn dr_grpo_against_the_grpo_it_is_not_fails() {
    let (json, out) = check(
        "rollouts.jsonl",
        "grpo_grpo",
        POLICY,
        &["--expect-aggregation", "seq_mean_token_sum_norm"],
    );
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert!(findings(&json).contains(&(
        "policy-aggregation-mismatch".to_string(),
        "error".to_string()
    )));
}
