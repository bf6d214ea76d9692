//! The gradient weight map against the analytic weights of every fixture loss, and the
//! optimizer-step simulation on hand-computable data.

mod common;

use common::*;
use serde_json::Value;

const DATA: &str = "fixtures/padded_labels.jsonl";
const BATCH: usize = 4;

/// One row of `--weights-out`.
struct RowWeights {
    mask: Vec<f64>,
    weight: Vec<f64>,
    residual: Vec<f64>,
}

fn weights_of(loss: &str, args: &str) -> (Vec<RowWeights>, Value) {
    let dir = TempDir::new(&format!("weights-{loss}"));
    let out_file = dir.path().join("w.jsonl").display().to_string();
    let loss_path = fixture(&format!("losses/{loss}.pt"));
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        "--format",
        "json",
        &fixture("tiny_lm.pt"),
        DATA,
        "--batch-size",
        "4",
        "--loss",
        &loss_path,
        "--loss-args",
        args,
        "--weights-out",
        &out_file,
    ]);
    assert!(out.code == 0 || out.code == 1, "{out:?}");
    let json: Value = serde_json::from_str(&out.stdout).unwrap();
    let text = std::fs::read_to_string(&out_file).unwrap();
    let floats = |v: &Value| -> Vec<f64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let rows = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            RowWeights {
                mask: floats(&v["mask"]),
                weight: floats(&v["weight"]),
                residual: floats(&v["residual"]),
            }
        })
        .collect();
    (rows, json)
}

/// The analytic weight of every target of one batch, from its target mask.
fn analytic(kind: &str, batch: &[RowWeights]) -> Vec<f64> {
    let n: f64 = batch.iter().map(|r| r.mask.len() as f64).sum();
    let trained: f64 = batch.iter().flat_map(|r| &r.mask).sum();
    let rows_trained = batch
        .iter()
        .filter(|r| r.mask.iter().sum::<f64>() > 0.0)
        .count() as f64;
    batch
        .iter()
        .flat_map(|r| {
            let row_trained: f64 = r.mask.iter().sum();
            r.mask.iter().map(move |&m| match kind {
                "token_mean" => m / trained,
                "scaled_token_mean" => 1.37 * m / trained,
                "all_positions" => 1.0 / n,
                "mask_numel" => m / n,
                "sequence_mean" if row_trained > 0.0 => m / (row_trained * rows_trained),
                "sequence_mean" => 0.0,
                "sum" => m,
                other => panic!("{other}"),
            })
        })
        .collect()
}

#[test]
fn recovered_weights_match_the_analytic_ones_for_every_fixture_loss() {
    let cases = [
        ("correct_labels", "logits,labels", "token_mean"),
        (
            "correct_shifted",
            "shift_logits,targets,loss_mask",
            "token_mean",
        ),
        (
            "reduce_then_mask",
            "shift_logits,targets,loss_mask",
            "all_positions",
        ),
        ("pad_not_ignored", "logits,input_ids", "all_positions"),
        ("mask_numel", "shift_logits,targets,loss_mask", "mask_numel"),
        (
            "sequence_mean",
            "shift_logits,targets,loss_mask",
            "sequence_mean",
        ),
        ("masked_sum", "shift_logits,targets,loss_mask", "sum"),
        (
            "scaled_wrong",
            "shift_logits,targets,loss_mask",
            "scaled_token_mean",
        ),
        ("logits_leak", "logits,labels", "token_mean"),
    ];
    for (loss, args, kind) in cases {
        let (rows, json) = weights_of(loss, args);
        assert_eq!(rows.len(), 29, "{loss}: one line per row");
        for (b, batch) in rows.chunks(BATCH).enumerate() {
            let want = analytic(kind, batch);
            let got: Vec<f64> = batch.iter().flat_map(|r| r.weight.clone()).collect();
            let scale = want.iter().fold(0.0f64, |a, w| a.max(w.abs()));
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * scale,
                    "{loss}, batch {b}, target {i}: weight {g}, analytic {w}"
                );
            }
        }
        let g = &json["user_loss"]["gradient"];
        let residual = g["max_residual"].as_f64().unwrap();
        if loss == "logits_leak" {
            // 0.1 × mean(logits) adds a gradient off the cross-entropy's direction.
            assert!(residual > 1e-3, "{loss}: {g}");
        } else {
            assert!(residual < 1e-4, "{loss}: {g}");
        }
        let untrained = g["max_untrained_share"].as_f64().unwrap();
        assert_eq!(
            untrained > 0.1,
            kind == "all_positions",
            "{loss}: untrained share {untrained}"
        );
    }
}

#[test]
fn wrong_targets_leave_a_residual_and_a_finding() {
    for (loss, args) in [
        ("double_shift", "shift_logits,labels"),
        ("no_shift", "logits,labels"),
    ] {
        let (rows, json) = weights_of(loss, args);
        let worst = rows
            .iter()
            .flat_map(|r| r.residual.iter().copied())
            .fold(0.0, f64::max);
        assert!(worst > 0.5, "{loss}: residual {worst}");
        let codes: Vec<&str> = json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap())
            .collect();
        assert!(
            codes.contains(&"gradient-not-cross-entropy"),
            "{loss}: {codes:?}"
        );
    }
}

// ---- steps ----

/// Rows of `len` tokens, each trained on every target.
fn row(len: usize) -> String {
    let ids: Vec<String> = (0..len).map(|i| (3 + i % 40).to_string()).collect();
    format!("{{\"input_ids\":[{}]}}\n", ids.join(","))
}

fn steps_json(data: &str, extra: &[&str]) -> (Value, Output) {
    // One directory per call: the tests of this file run in parallel in one process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = TempDir::new(&format!("steps-{n}"));
    let path = dir.write("d.jsonl", data);
    let mut args = vec![
        "check",
        "--device",
        "cpu",
        "--format",
        "json",
        "--pad-id",
        "0",
        "--micro-batch",
        "1",
    ];
    let model = fixture("tiny_lm.pt");
    args.push(&model);
    args.push(&path);
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (json, out)
}

fn formula<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["steps"]["formulas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["formula"] == name)
        .unwrap_or_else(|| panic!("{name} in {json}"))
}

fn close(v: &Value, want: f64) -> bool {
    (v.as_f64().unwrap() - want).abs() < 1e-9
}

#[test]
fn a_mean_of_micro_batch_means_gives_a_lone_token_five_times_its_weight() {
    // Micro-batches of one row: 1 and 9 trained targets, one step of K = 2.
    let data = row(2) + &row(10);
    let (json, out) = steps_json(&data, &["--accum", "2"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(close(
        &formula(&json, "global_token_mean")["worst_max_relative_weight"],
        1.0
    ));
    let mom = formula(&json, "mean_of_micro_batch_means");
    assert!(close(&mom["worst_max_relative_weight"], 5.0), "{mom}");
    assert!(close(&mom["worst_max_min_ratio"], 9.0), "{mom}");
    let f = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "accumulation-misweighted")
        .unwrap();
    assert_eq!(f["severity"], "info");

    // The user's per-micro-batch token mean is that formula: an error.
    let loss = fixture("losses/correct_labels.pt");
    let (json, out) = steps_json(&data, &["--accum", "2", "--loss", &loss]);
    assert_eq!(out.code, 1, "{out:?}");
    let yours = formula(&json, "your_loss");
    assert!(
        (yours["worst_max_relative_weight"].as_f64().unwrap() - 5.0).abs() < 1e-4,
        "{yours}"
    );
    assert!(json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "accumulation-misweighted" && f["severity"] == "error"));

    // The num_items_in_batch loss is the truth: no finding, exit 0.
    let loss = fixture("odd/num_items_loss.pt");
    let (json, out) = steps_json(
        &data,
        &[
            "--accum",
            "2",
            "--loss",
            &loss,
            "--loss-args",
            "shift_logits,targets,loss_mask,num_items_in_batch",
        ],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let yours = formula(&json, "your_loss");
    assert!(
        yours["worst_total_variation"].as_f64().unwrap() < 1e-4,
        "{yours}"
    );
    assert!(
        (yours["min_total_weight"].as_f64().unwrap() - 1.0).abs() < 1e-4,
        "{yours}"
    );
    // One row a batch: a token mean and a sequence mean cannot be told apart per batch.
    let candidates = json["user_loss"]["candidates"].as_array().unwrap();
    assert!(
        candidates.contains(&Value::from("masked_token_mean")),
        "{json}"
    );
}

#[test]
fn a_partial_last_window_is_underweighted_unless_dropped() {
    let data = row(5) + &row(5) + &row(5);
    let (json, _) = steps_json(&data, &["--accum", "2"]);
    assert_eq!(json["steps"]["steps"].as_array().unwrap().len(), 2);
    let mom = formula(&json, "mean_of_micro_batch_means");
    assert!(close(&mom["min_total_weight"], 0.5), "{mom}");
    assert!(close(
        &formula(&json, "global_token_mean")["min_total_weight"],
        1.0
    ));

    let (json, _) = steps_json(&data, &["--accum", "2", "--drop-last"]);
    assert_eq!(json["steps"]["dropped_micro_batches"], 1);
    assert_eq!(json["steps"]["steps"].as_array().unwrap().len(), 1);
    assert!(close(
        &formula(&json, "mean_of_micro_batch_means")["min_total_weight"],
        1.0
    ));
}

#[test]
fn ranks_with_their_own_token_counts_are_shown() {
    // Two ranks, one micro-batch each: 1 and 3 trained targets.
    let data = row(2) + &row(4);
    let (json, _) = steps_json(&data, &["--world-size", "2"]);
    let per_rank = formula(&json, "per_rank_token_mean");
    assert!(
        close(&per_rank["worst_max_relative_weight"], 2.0),
        "{per_rank}"
    );
    assert!(close(
        &formula(&json, "num_items_in_batch")["worst_total_variation"],
        0.0
    ));
}
