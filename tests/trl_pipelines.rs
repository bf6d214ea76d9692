//! Correct real pipelines get no warning and no error, and the trainer's numbers (issue 20):
//! the micro-batches of trl's SFTTrainer (completion-only, pad = eos, plain text) and of
//! transformers' language-modeling collator on a tiny Llama, written with transformers' own
//! loss of each by tests/export/trl_pipelines.py (`make hf-models`, under
//! target/hf-models/trl).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const CASES: [&str; 4] = [
    "sft_completion_only",
    "sft_pad_is_eos",
    "sft_text",
    "pretrain_hf_collator",
];

fn dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hf-models/trl");
    assert!(
        dir.join("model.pt").is_file(),
        "{} is missing: run `make hf-models` (make test does)",
        dir.display()
    );
    dir
}

/// `check` on one case, as the trainer batched it, with `extra` arguments.
fn check(case: &str, extra: &[&str]) -> (Value, Value, Output) {
    let dir = dir();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(case).join("expected.json")).unwrap(),
    )
    .unwrap();
    let (model, data) = (
        dir.join("model.pt").display().to_string(),
        dir.join(case).join("data.jsonl").display().to_string(),
    );
    let batch = expected["batch_size"].to_string();
    let pad = expected["pad_id"].to_string();
    let eos = expected["eos_id"].to_string();
    let mut args = vec![
        "check",
        "--device",
        "cpu",
        "--format",
        "json",
        &model,
        &data,
        "--batch-size",
        &batch,
        "--pad-id",
        &pad,
        "--eos-id",
        &eos,
    ];
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{case}: {e}: {out:?}"));
    (json, expected, out)
}

/// Warnings and errors, as "severity[code]: message".
fn loud(json: &Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] != "info")
        .map(|f| format!("{}[{}]: {}", f["severity"], f["code"], f["message"]))
        .collect()
}

#[test]
fn a_correct_pipeline_passes_with_the_trainers_loss() {
    for case in CASES {
        let (json, expected, out) = check(case, &[]);
        assert_eq!(out.code, 0, "{case}: {out:?}");
        assert_eq!(loud(&json), Vec::<String>::new(), "{case}");
        assert_eq!(json["data"]["batches"], expected["batches"], "{case}");
        assert_eq!(
            json["data"]["supervised_positions"], expected["trained"],
            "{case}"
        );
        let got = json["losses"]["masked_token_mean"].as_f64().unwrap();
        let want = expected["token_mean"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "{case}: maskaudit {got}, transformers {want}"
        );
    }
}

#[test]
fn a_correct_loss_on_a_correct_pipeline_passes() {
    let loss = fixture("losses/correct_labels.pt");
    for case in CASES {
        let (json, _, out) = check(case, &["--loss", &loss]);
        assert_eq!(out.code, 0, "{case}: {out:?}");
        assert_eq!(loud(&json), Vec::<String>::new(), "{case}");
        assert_eq!(
            json["user_loss"]["matched"], "masked_token_mean",
            "{case}: {}",
            json["user_loss"]
        );
    }
}
