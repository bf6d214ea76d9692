//! Correct real pipelines get no warning and no error, and the trainer's numbers (issue 20):
//! the micro-batches of trl's SFTTrainer (completion-only, pad = eos, plain text) and of
//! transformers' language-modeling collator on a tiny Llama, written with transformers' own
//! loss of each by tests/export/trl_pipelines.py (`make hf-models`, under
//! target/hf-models/trl).

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

const CASES: [&str; 4] = [
    "sft_completion_only",
    "sft_pad_is_eos",
    "sft_text",
    "pretrain_hf_collator",
];

fn dir() -> PathBuf {
    hf_models("trl", "model.pt")
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

/// The trained count and the masked token mean are transformers' own, the mean to 1e-5.
fn assert_trainers_loss(json: &Value, expected: &Value, what: &str) {
    assert_eq!(
        json["data"]["supervised_positions"], expected["trained"],
        "{what}"
    );
    let got = json["losses"]["masked_token_mean"].as_f64().unwrap();
    let want = expected["token_mean"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * want.abs(),
        "{what}: maskaudit {got}, transformers {want}"
    );
}

#[test]
fn a_correct_pipeline_passes_with_the_trainers_loss() {
    for case in CASES {
        let (json, expected, out) = check(case, &[]);
        assert_eq!(out.code, 0, "{case}: {out:?}");
        assert_eq!(loud(&json), Vec::<String>::new(), "{case}");
        assert_eq!(json["data"]["batches"], expected["batches"], "{case}");
        assert_trainers_loss(&json, &expected, case);
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

/// trl's padding-free rows, the documents given by position_ids, cu_seqlens or a 4D mask.
const PACKED: [&str; 3] = ["packed_position_ids", "packed_cu_seqlens", "packed_4d_mask"];

/// `check` on a packed case through `model`, at `batch` rows a batch.
fn check_packed(case: &str, model: &str, batch: &str) -> (Value, Value, Output) {
    let dir = dir();
    // A case is a folder (its data.jsonl) or a file in one.
    let file = if case.ends_with(".parquet") {
        case.to_string()
    } else {
        format!("{case}/data.jsonl")
    };
    let case = case.split('/').next().unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(case).join("expected.json")).unwrap(),
    )
    .unwrap();
    let model = dir.join(model).display().to_string();
    let data = dir.join(file).display().to_string();
    // Packed rows are longer than the exporter's verified lengths; each document is not.
    let args = [
        "check",
        "--device",
        "cpu",
        "--format",
        "json",
        &model,
        &data,
        "--batch-size",
        batch,
        "--pad-id",
        "0",
        "--eos-id",
        "2",
        "--allow",
        "model-length-unverified",
    ];
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{case}: {e}: {out:?}"));
    (json, expected, out)
}

#[test]
fn packed_rows_give_the_trainers_loss_kept_apart_or_split() {
    for case in PACKED {
        for (model, split) in [("model.pt", false), ("model_padded.pt", true)] {
            for batch in ["1", "4"] {
                let what = format!("{case} through {model} at batch size {batch}");
                let (json, expected, out) = check_packed(case, model, batch);
                assert_eq!(out.code, 0, "{what}: {out:?}");
                assert_eq!(loud(&json), Vec::<String>::new(), "{what}");
                assert_trainers_loss(&json, &expected, &what);
                let packing = &json["data"]["packing"];
                assert!(packing["packed_rows"].as_u64().unwrap() > 0, "{what}");
                let split_codes = json["findings"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|f| f["code"] == "packed-rows-split")
                    .count();
                if split {
                    assert!(packing["split_documents"].as_u64().unwrap() > 4, "{what}");
                    assert_eq!(split_codes, 1, "{what}");
                } else {
                    assert_eq!(packing["split_rows"], 0, "{what}");
                    assert_eq!(split_codes, 0, "{what}");
                    let d = packing["probe_difference"].as_f64().unwrap();
                    assert!(d <= packing["probe_tolerance"].as_f64().unwrap(), "{what}");
                }
            }
        }
    }
}

/// Parquet reads 2D and 4D block masks as JSONL does: the same documents, the trainer's loss.
#[test]
fn parquet_block_masks_give_the_trainers_loss() {
    for case in ["packed_4d_mask/data.parquet", "packed_2d_mask/data.parquet"] {
        for (model, batch) in [("model.pt", "4"), ("model_padded.pt", "1")] {
            let what = format!("{case} through {model} at batch size {batch}");
            let (json, expected, out) = check_packed(case, model, batch);
            assert_eq!(out.code, 0, "{what}: {out:?}");
            assert_trainers_loss(&json, &expected, &what);
            assert!(
                json["data"]["packing"]["packed_rows"].as_u64().unwrap() > 0,
                "{what}"
            );
        }
    }
}

#[test]
fn a_model_that_lets_documents_attend_across_fails_the_packing_probe() {
    let (json, _, out) = check_packed("packed_cu_seqlens", "model_crossing.pt", "1");
    assert_eq!(out.code, 1, "{out:?}");
    let codes: Vec<&str> = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["model-crosses-documents"], "{json}");
}
