//! `check --dtype` and `--tf32` on the CPU: the run's dtype is reported, and the aggregates of a
//! reduced-precision run stay within that precision's tolerance of PyTorch's float32 numbers
//! (fixtures/expected.json).

mod common;

use common::{expected, fixture, maskaudit};

/// Runs `check` on the fixture LM and ragged rows (expected.json's first case) on the CPU.
fn check(extra: &[&str]) -> (serde_json::Value, common::Output) {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    let mut args = vec![
        "check",
        &model,
        &data,
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON contract ({e}): {out:?}"));
    (json, out)
}

fn expected_masked_mean() -> f64 {
    let e = expected();
    let case = &e["cases"][0];
    assert_eq!(case["name"], "ragged_tiny_lm_b4");
    case["losses"]["masked_token_mean"].as_f64().unwrap()
}

fn masked_mean(report: &serde_json::Value) -> f64 {
    report["losses"]["masked_token_mean"].as_f64().unwrap()
}

#[test]
fn auto_and_float32_run_the_model_in_its_own_dtype() {
    let (auto, out) = check(&[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(auto["model"]["dtype"], "float32");
    assert_eq!(auto["model"]["run_dtype"], "float32");
    // TF32 is a CUDA setting: never in effect on the CPU, whatever --tf32 says.
    assert_eq!(auto["model"]["tf32"], false);
    let want = expected_masked_mean();
    assert!((masked_mean(&auto) - want).abs() <= 1e-5 * want);

    let (f32, out) = check(&["--dtype", "float32", "--tf32", "on"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(f32["model"]["run_dtype"], "float32");
    assert_eq!(f32["model"]["tf32"], false);
    assert_eq!(f32["losses"], auto["losses"], "same dtype, same numbers");
}

/// bf16 keeps 8 bits of mantissa: logits of size ~10 move by ~0.04, the loss by about as much
/// per token, and the mean over 355 tokens by less. The losses are still f32 and the sums f64.
#[test]
fn bfloat16_runs_within_bf16_tolerance_of_pytorch_float32() {
    let (bf16, out) = check(&["--dtype", "bfloat16"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(bf16["model"]["dtype"], "float32", "the model's own dtype");
    assert_eq!(bf16["model"]["run_dtype"], "bfloat16");
    assert_eq!(bf16["model"]["tf32"], false);
    let (got, want) = (masked_mean(&bf16), expected_masked_mean());
    let relative = (got - want).abs() / want;
    assert!(relative <= 2e-2, "bf16 {got} vs f32 {want}: {relative:.2e}");
    assert!(relative > 0.0, "the run was not in bf16");
    // The trace-consistency probe judges bf16 logits with the half-precision tolerance.
    assert_eq!(bf16["model"]["consistency"]["tolerance"], 3e-2);
    assert_eq!(bf16["verdict"], "pass", "{}", out.stdout);
}

#[test]
fn float16_runs_within_half_tolerance_of_pytorch_float32() {
    let (f16, out) = check(&["--dtype", "float16"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(f16["model"]["run_dtype"], "float16");
    let (got, want) = (masked_mean(&f16), expected_masked_mean());
    let relative = (got - want).abs() / want;
    assert!(relative <= 5e-3, "f16 {got} vs f32 {want}: {relative:.2e}");
}

#[test]
fn the_table_names_the_run_dtype() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    let out = maskaudit(&[
        "check", &model, &data, "--pad-id", "0", "--device", "cpu", "--dtype", "bfloat16",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout
            .contains("model  float32 run in bfloat16, vocabulary 48 on cpu"),
        "{}",
        out.stdout
    );
}

#[test]
fn unknown_dtype_and_tf32_values_are_usage_errors() {
    for (flag, value) in [("--dtype", "int8"), ("--tf32", "maybe")] {
        let model = fixture("tiny_lm.pt");
        let data = fixture("ragged.jsonl");
        let out = maskaudit(&["check", &model, &data, "--pad-id", "0", flag, value]);
        assert_eq!(out.code, 2, "{out:?}");
        assert!(out.stderr.contains(value), "{}", out.stderr);
    }
}

/// A user's loss audited with the model run in bf16 gets float32 logits (as Hugging Face's loss
/// functions upcast them): the correct loss is still recognised, without precision noise
/// turning into findings.
#[test]
fn a_correct_user_loss_passes_in_bfloat16() {
    let loss = fixture("losses/correct_labels.pt");
    let (report, out) = check(&["--dtype", "bfloat16", "--loss", &loss]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(report["model"]["run_dtype"], "bfloat16");
    assert_eq!(report["verdict"], "pass", "{}", out.stdout);
    let verdict = report["user_loss"]["verdict"].as_str().unwrap();
    assert!(verdict.contains("which is correct"), "{verdict}");
}
