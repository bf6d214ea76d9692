//! `check --captured-losses`: runs captured on both ranks of `torchrun --nproc_per_node 2`
//! (gloo, CPU) by tests/export/capture_ranks.py (`make hf-models`, under
//! target/hf-models/capture_ranks), audited from the per-token losses each rank recorded, with
//! no model. Each case's expected.json is the truth recomputed in one process over every
//! rank's captured batches with the eager model in float64.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn dir() -> PathBuf {
    hf_models("capture_ranks", "model.pt")
}

/// `check --captured-losses` on `path` (under the directory), with `extra` arguments; its JSON
/// report and the exit status.
fn check(path: &str, extra: &[&str]) -> (Value, Output) {
    let data = dir().join(path).display().to_string();
    let mut args = vec!["check", "--captured-losses", &data, "--format", "json"];
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{path}: {e}: {out:?}"));
    (json, out)
}

fn expected(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join(case).join("expected.json")).unwrap())
        .unwrap()
}

fn close(got: &Value, want: &Value, what: &str) {
    let (got, want) = (got.as_f64().unwrap(), want.as_f64().unwrap());
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "{what}: maskaudit {got}, recomputed {want}"
    );
}

/// Loud findings (errors and warnings), in order.
fn loud(json: &Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error" || f["severity"] == "warning")
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

/// Each case: its formula across the ranks, what num_items_in_batch counted, the findings and
/// the exit status; and the numbers, equal to the single-process recomputation to 1e-6.
#[test]
fn each_ranks_normalisation_is_named_and_the_numbers_are_the_truth() {
    for (case, formula, counted, findings, code) in [
        ("sft_global", "global_token_mean", "global", vec![], 0),
        (
            "trainer_per_rank",
            "per_rank_mean_averaged",
            "rank",
            vec!["accumulation-misweighted"],
            1,
        ),
        (
            "loop_world_size",
            "divided_by_world_size",
            "global",
            vec!["accumulation-misweighted"],
            1,
        ),
    ] {
        let want = expected(case);
        let (json, out) = check(case, &[]);
        assert_eq!(out.code, code, "{case}: {out:?}");
        assert_eq!(loud(&json), findings, "{case}: {}", json["findings"]);
        let ranks = &json["ranks"];
        assert_eq!(ranks["formula"], formula, "{case}: {ranks}");
        assert_eq!(ranks["world_size"], want["world_size"], "{case}");
        for step in ranks["steps"].as_array().unwrap() {
            for rank in step["ranks"].as_array().unwrap() {
                assert_eq!(rank["counted"], counted, "{case}: {step}");
            }
        }
        close(
            &json["losses"]["masked_token_mean"],
            &want["token_mean"],
            case,
        );
        assert_eq!(
            json["data"]["supervised_positions"], want["trained"],
            "{case}"
        );
        assert_eq!(json["data"]["batches"], want["micro_batches"], "{case}");
        for (got, truth) in ranks["ranks"]
            .as_array()
            .unwrap()
            .iter()
            .zip(want["ranks"].as_array().unwrap())
        {
            assert_eq!(got["trained"], truth["trained"], "{case}: {got}");
            close(&got["token_mean"], &truth["token_mean"], case);
        }
        let weights = &ranks["weights"];
        let total = weights["total_weight"].as_f64().unwrap();
        match formula {
            // Each rank's tokens weigh 1/(W·N_r): rank 0's few the most, N / (W·N_0).
            "per_rank_mean_averaged" => {
                let n = want["trained"].as_f64().unwrap();
                let n0 = want["ranks"][0]["trained"].as_f64().unwrap();
                let heaviest = weights["max_relative_weight"].as_f64().unwrap();
                assert!((heaviest - n / (2.0 * n0)).abs() < 1e-9, "{weights}");
            }
            // The ranks' averaging halves a step normalised by the global count.
            "divided_by_world_size" => assert!((total - 0.5).abs() < 1e-9, "{weights}"),
            _ => assert!((total - 1.0).abs() < 1e-9, "{weights}"),
        }
    }
}

/// One rank's file names the run: its siblings join it.
#[test]
fn one_rank_file_brings_its_run() {
    let (json, out) = check("sft_global/run.rank1.parquet", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json["ranks"]["ranks"].as_array().unwrap().len(), 2);
}

/// With the model the ranks trained, its losses on the captured batches are the recorded
/// ones; with recorded losses 1% off, `captured-losses-mismatch`.
#[test]
fn a_model_is_cross_checked_against_the_recorded_losses() {
    let model = dir().join("model.pt").display().to_string();
    let (json, out) = check("trainer_per_rank", &[&model, "--device", "cpu"]);
    assert_eq!(out.code, 1, "{out:?}");
    let cross = &json["ranks"]["cross_check"];
    assert_eq!(cross["batches"], 4, "{cross}");
    assert_eq!(cross["positions_off"], 0, "{cross}");
    assert!(!loud(&json).contains(&"captured-losses-mismatch".to_string()));
    let (json, out) = check("broken/not_the_model", &[&model, "--device", "cpu"]);
    assert_eq!(out.code, 1, "{out:?}");
    let finding = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "captured-losses-mismatch")
        .unwrap_or_else(|| panic!("{}", json["findings"]));
    assert!(
        finding["message"]
            .as_str()
            .unwrap()
            .contains("first on rank 1"),
        "{finding}"
    );
}

/// Captures that cannot be merged are bad input: one line, exit 2.
#[test]
fn captures_that_cannot_be_merged_are_usage_errors() {
    for (path, expect) in [
        ("broken/missing_rank", "rank 1 of world size 2 is missing"),
        ("broken/world_sizes", "world size 3 where"),
        (
            "broken/no_token_losses",
            "without its maskaudit_token_losses column",
        ),
        ("no_such_dir", "no such file or directory"),
    ] {
        let data = dir().join(path).display().to_string();
        let out = maskaudit(&["check", "--captured-losses", &data]);
        assert_usage_error(&out, expect);
        assert!(out.stdout.is_empty(), "{path}: {out:?}");
    }
    let model = dir().join("model.pt").display().to_string();
    let data = dir().join("sft_global").display().to_string();
    let out = maskaudit(&["check", "--captured-losses", &data, &model, &model]);
    assert_eq!(out.code, 2, "DATA beside --captured-losses: {out:?}");
}

/// A single-process capture's recorded losses give `check --captured-losses` the numbers
/// `check MODEL` computes from the model on the same batches (the plain loop trains in
/// float32, so both are float32 losses of the same logits).
#[test]
fn recorded_losses_give_the_models_numbers() {
    let capture = hf_models("capture", "model.pt");
    let model = capture.join("model.pt").display().to_string();
    let data = capture.join("plain_loop/run.parquet").display().to_string();
    let with_model = maskaudit(&[
        "check", "--device", "cpu", "--format", "json", &model, &data, "--pad-id", "0",
    ]);
    let recorded = maskaudit(&[
        "check",
        "--captured-losses",
        &data,
        "--format",
        "json",
        "--pad-id",
        "0",
    ]);
    let (a, b): (Value, Value) = (
        serde_json::from_str(&with_model.stdout).unwrap(),
        serde_json::from_str(&recorded.stdout).unwrap(),
    );
    assert_eq!(
        a["data"]["supervised_positions"],
        b["data"]["supervised_positions"]
    );
    for key in ["masked_token_mean", "all_positions_mean", "sequence_mean"] {
        close(&b["losses"][key], &a["losses"][key], key);
    }
    assert_eq!(b["ranks"]["world_size"], 1, "{}", b["ranks"]);
}

/// No report lands on a rank's file: neither of the directory named nor a sibling of the file
/// named, and the file is left as it was.
#[test]
fn no_report_lands_on_a_captured_rank_file() {
    let tmp = TempDir::new("captured-outputs");
    for rank in ["run.rank0.parquet", "run.rank1.parquet"] {
        std::fs::copy(dir().join("sft_global").join(rank), tmp.path().join(rank)).unwrap();
    }
    let before = std::fs::read(tmp.path().join("run.rank0.parquet")).unwrap();
    let rank0 = tmp.path().join("run.rank0.parquet").display().to_string();
    let rank1 = tmp.path().join("run.rank1.parquet").display().to_string();
    let folder = tmp.path().display().to_string();
    for (data, flag) in [(&folder, "--junit"), (&rank1, "--html")] {
        let out = maskaudit(&["check", "--captured-losses", data, flag, &rank0]);
        assert_usage_error(&out, "refusing to overwrite an input");
    }
    assert_eq!(
        std::fs::read(tmp.path().join("run.rank0.parquet")).unwrap(),
        before
    );
}
