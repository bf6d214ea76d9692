//! Policy and preference losses through the real binary (issue 24): each fixture loss of
//! fixtures/generate_rl.py classified as the generator says, its probe weights equal to the
//! ones PyTorch computed (fixtures/rl/expected.json), the buggy ones failing with their code.

mod common;

use common::*;
use serde_json::Value;

const PREFERENCE: &str = "chosen_logprobs,rejected_logprobs,chosen_mask,rejected_mask,ref_chosen_logprobs,ref_rejected_logprobs";

fn expected() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/rl/expected.json"),
    )
    .expect("fixtures/rl/expected.json");
    serde_json::from_str(&text).unwrap()
}

fn run(data: &str, loss: &str, args: &str, extra: &[&str]) -> (Value, Output) {
    let data = fixture(&format!("rl/{data}"));
    check_rl(
        &data,
        &fixture(&format!("rl/losses/{loss}.pt")),
        args,
        extra,
    )
}

fn codes(json: &Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_policy_loss_is_classified_with_the_generators_weights() {
    let expected = expected();
    let cases = expected["policy"].as_object().unwrap();
    assert!(cases.len() >= 10);
    for (name, want) in cases {
        let args = policy_loss_args(want);
        let (json, out) = run("rollouts.jsonl", name, &args, &[]);
        let user = &json["user_loss"];
        assert_eq!(
            user["aggregation"], want["aggregation"],
            "{name}: {}",
            out.stdout
        );
        let policy = &user["policy"];
        if let Some(c) = want["constant"].as_f64() {
            assert!(
                close(policy["constant"].as_f64().unwrap(), c),
                "{name}: {policy}"
            );
        }
        let got: Vec<f64> = policy["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["token_weight"].as_f64().unwrap())
            .collect();
        let hand: Vec<f64> = want["token_weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), hand.len(), "{name}");
        for (g, h) in got.iter().zip(&hand) {
            assert!(close(*g, *h), "{name}: weight {g} against PyTorch's {h}");
        }
        let (code, errors): (i32, &[&str]) = match name.as_str() {
            "broadcast_length_squared" => (1, &["policy-aggregation-unrecognised"]),
            // Masked by multiplication, but these rollouts' masked slots are finite: a warning.
            "nan_times_zero" | "tool_leak" => (0, &["policy-nan-through-mask"]),
            _ => (0, &[]),
        };
        assert_eq!(out.code, code, "{name}: {}", out.stdout);
        assert_eq!(codes(&json), errors, "{name}");
    }
}

#[test]
fn the_length_bias_of_each_aggregation_is_its_exponent() {
    for (name, exponent) in [
        ("token_mean", 1.0),
        ("seq_mean_token_mean", 0.0),
        ("seq_mean_token_sum", 1.0),
        ("broadcast_length_squared", 2.0),
    ] {
        let (json, _) = run("rollouts.jsonl", name, POLICY, &[]);
        let e = json["user_loss"]["policy"]["sequence_weight_exponent"]
            .as_f64()
            .unwrap();
        assert!((e - exponent).abs() < 1e-4, "{name}: {e}");
    }
}

#[test]
fn tool_output_that_gets_weight_fails() {
    let (json, out) = run("tool_rollouts.jsonl", "tool_leak", POLICY, &[]);
    assert_eq!(out.code, 1);
    assert!(
        codes(&json).contains(&"policy-trains-masked".to_string()),
        "{}",
        out.stdout
    );
    assert!(
        json["user_loss"]["policy"]["max_masked_share"]
            .as_f64()
            .unwrap()
            > 0.01
    );
    // The correct loss on the same rollouts (per-token advantages, null old log-probs at the
    // masked slots) passes.
    let (json, out) = run("tool_rollouts.jsonl", "token_mean", POLICY, &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(json["user_loss"]["aggregation"], "token_mean");
}

#[test]
fn nan_the_rollouts_carry_at_masked_slots_fails_a_loss_that_multiplies() {
    // tool_rollouts.jsonl: null old log-probs at every masked slot.
    let (json, out) = run("tool_rollouts.jsonl", "nan_times_zero", POLICY, &[]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(codes(&json), ["policy-nan-through-mask"]);
    assert_eq!(json["findings"][0]["severity"], "error");
    let data = &json["user_loss"]["policy"]["data_pass"];
    assert_eq!(data["non_finite_line"], 1, "{data}");
    // The same loss on finite rollouts: the probe's warning only.
    let (json, out) = run("rollouts.jsonl", "nan_times_zero", POLICY, &[]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    assert_eq!(json["findings"][0]["severity"], "warning");
    assert_eq!(json["user_loss"]["policy"]["nan_probe"]["passed"], false);
}

#[test]
fn an_extra_division_by_the_accumulation_steps_fails_the_step() {
    let args = format!("{POLICY},num_items_in_batch");
    let (json, out) = run("rollouts.jsonl", "dapo_over_ga", &args, &["--accum", "2"]);
    assert_eq!(out.code, 1, "{}", out.stdout);
    assert_eq!(codes(&json), ["policy-step-misnormalised"]);
    let (json, out) = run("rollouts.jsonl", "dapo", &args, &["--accum", "2"]);
    assert_eq!(out.code, 0, "{}", out.stdout);
    let steps = json["user_loss"]["policy"]["steps"].as_array().unwrap();
    assert!(close(steps[0]["total_weight"].as_f64().unwrap(), 1.0));
}

#[test]
fn an_expected_aggregation_that_differs_fails() {
    let (json, out) = run(
        "rollouts.jsonl",
        "seq_mean_token_mean",
        POLICY,
        &["--expect-aggregation", "token_mean"],
    );
    assert_eq!(out.code, 1);
    assert_eq!(codes(&json), ["policy-aggregation-mismatch"]);
    let (_, out) = run(
        "rollouts.jsonl",
        "dr_grpo",
        POLICY,
        &["--expect-aggregation", "seq-mean-token-sum-norm"],
    );
    assert_eq!(out.code, 0);
}

#[test]
fn preference_losses_sum_or_average_their_log_probs() {
    let expected = expected();
    for (name, want) in expected["preference"].as_object().unwrap() {
        let (json, out) = run("pairs.jsonl", name, PREFERENCE, &[]);
        let policy = &json["user_loss"]["policy"];
        assert_eq!(
            policy["preference_logps"], want["preference_logps"],
            "{name}"
        );
        assert_eq!(json["user_loss"]["aggregation"], Value::Null);
        if want["preference_logps"].is_null() {
            assert_eq!(out.code, 1, "{name}");
            assert_eq!(codes(&json), ["policy-padding-in-statistic"]);
        } else {
            assert_eq!(out.code, 0, "{name}: {}", out.stdout);
        }
    }
}

/// A run expected to stop on bad input: its one stderr line.
fn refused(data: &str, args: &str) -> String {
    let (loss, model) = (fixture("rl/losses/token_mean.pt"), fixture("tiny_lm.pt"));
    let argv = [
        "check",
        "--device",
        "cpu",
        &model,
        data,
        "--loss",
        &loss,
        "--loss-args",
        args,
    ];
    let out = maskaudit(&argv);
    assert_eq!(out.code, 2, "{out:?}");
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    out.stderr.trim().to_string()
}

#[test]
fn bad_rollouts_and_arguments_are_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("maskaudit-rl-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("bad.jsonl");
    std::fs::write(&data, "{\"input_ids\":[3,4,5],\"response_mask\":[0,1,1]}\n").unwrap();
    let data = data.display().to_string();
    assert_eq!(
        refused(&data, POLICY),
        format!("maskaudit: error: {data}:1: advantages: missing (the loss takes advantages)")
    );
    let line = refused(&data, "logprobs,logits");
    assert!(
        line.contains("--loss-args: logits cannot be given to a policy loss"),
        "{line}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
