//! The model path: what the forward's arguments are and how maskaudit knows, the
//! trace-consistency probe, what a MODEL file that is not TorchScript gets told, and the
//! header's padding and prompt figures. The odd models come from `fixtures/generate.py odd`;
//! their expected values were computed there with F.cross_entropy on the eager modules.

mod common;

use common::*;
use serde_json::Value;

fn run_json(args: &[&str]) -> (Value, Output) {
    let mut all = vec!["check", "--format", "json", "--device", "cpu"];
    all.extend_from_slice(args);
    let out = maskaudit(&all);
    let json = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"));
    (json, out)
}

fn odd(name: &str) -> String {
    fixture(&format!("odd/{name}.pt"))
}

fn odd_expected(name: &str) -> f64 {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/odd/expected.json"),
    )
    .expect("fixtures/odd/expected.json");
    let v: Value = serde_json::from_str(&text).unwrap();
    v[name]["masked_token_mean"].as_f64().expect(name)
}

/// masked_token_mean of the padded_labels case at batch size 4, from fixtures/expected.json.
fn padded_labels_b4(case: &str) -> f64 {
    let expected = expected();
    let case = expected["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == case)
        .unwrap_or_else(|| panic!("{case} in expected.json"));
    case["losses"]["masked_token_mean"].as_f64().unwrap()
}

const DATA: &str = "fixtures/padded_labels.jsonl";

fn args_of(json: &Value) -> Vec<&str> {
    json["model"]["forward_args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect()
}

#[test]
fn an_attention_mask_is_identified_by_probing_and_said() {
    let (json, out) = run_json(&[&fixture("tiny_lm_attn.pt"), DATA, "--batch-size", "4"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(args_of(&json), ["input_ids", "attention_mask"]);
    assert_eq!(json["model"]["forward_args_source"], "probe");
    assert!(
        json["model"]["forward_args_note"]
            .as_str()
            .unwrap()
            .contains("attention mask"),
        "{json}"
    );
    assert_eq!(json["model"]["signature"], "input_ids_attention_mask");
    assert_eq!(json["model"]["dtype"], "float32");
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        padded_labels_b4("padded_labels_tiny_lm_attn_b4"),
        "tiny_lm_attn",
    );
}

#[test]
fn relative_position_ids_are_identified_and_get_positions() {
    let (json, out) = run_json(&[&odd("relative_positions"), DATA, "--batch-size", "4"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(args_of(&json), ["input_ids", "position_ids"]);
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        odd_expected("relative_positions"),
        "relative positions",
    );
}

#[test]
fn absolute_position_ids_are_an_error_with_a_fix_then_right_when_named() {
    let model = odd("absolute_positions");
    let out = maskaudit(&["check", "--device", "cpu", &model, DATA]);
    assert_usage_error(&out, "--forward-args input_ids,position_ids");
    let (json, out) = run_json(&[
        &model,
        DATA,
        "--batch-size",
        "4",
        "--forward-args",
        "input_ids,position_ids",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json["model"]["forward_args_source"], "option");
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        odd_expected("absolute_positions"),
        "absolute positions",
    );
}

#[test]
fn a_loss_then_logits_forward_gives_the_logits_and_serves_loss_method_forward() {
    let want = padded_labels_b4("padded_labels_tiny_lm_b4");
    let (json, out) = run_json(&[&odd("labels_second"), DATA, "--batch-size", "4"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(args_of(&json), ["input_ids", "labels"]);
    assert_eq!(json["model"]["output"], "loss_then_logits");
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        want,
        "labels second",
    );
    let (json, out) = run_json(&[
        &odd("labels_second"),
        DATA,
        "--batch-size",
        "4",
        "--loss-method",
        "forward",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json["user_loss"]["matched"], "masked_token_mean", "{json}");
}

#[test]
fn a_three_argument_forward_is_named_not_guessed() {
    let model = odd("three_args");
    let out = maskaudit(&["check", "--device", "cpu", &model, DATA]);
    assert_usage_error(&out, "--forward-args");
    let want = padded_labels_b4("padded_labels_tiny_lm_attn_b4");
    let (json, out) = run_json(&[
        &model,
        DATA,
        "--batch-size",
        "4",
        "--forward-args",
        "input_ids,attention_mask,labels",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        want,
        "three args",
    );
    // --loss-method forward with the loss arguments names the forward's too.
    let (json, out) = run_json(&[
        &model,
        DATA,
        "--batch-size",
        "4",
        "--loss-method",
        "forward",
        "--loss-args",
        "input_ids,attention_mask,labels",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json["model"]["forward_args_source"], "loss_args");
    assert_eq!(json["user_loss"]["matched"], "masked_token_mean", "{json}");
    assert_close(
        json["losses"]["masked_token_mean"].as_f64().unwrap(),
        want,
        "three args, loss method",
    );
}

#[test]
fn a_length_dependent_trace_fails_the_consistency_probe() {
    let model = odd("length_leak");
    let (json, out) = run_json(&[&model, DATA, "--batch-size", "4"]);
    assert_eq!(out.code, 1, "{out:?}");
    let finding = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "model-not-pad-invariant")
        .unwrap_or_else(|| panic!("no model-not-pad-invariant finding: {json}"));
    assert_eq!(finding["severity"], "error");
    let c = &json["model"]["consistency"];
    assert!(c["ran"].as_bool().unwrap());
    assert!(c["longest_length"].as_i64().unwrap() > 24, "{c}");
    assert!(
        c["padding_difference"].as_f64().unwrap() > c["tolerance"].as_f64().unwrap(),
        "{c}"
    );

    let (json, out) = run_json(&[&model, DATA, "--batch-size", "4", "--no-model-probe"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json["model"]["consistency"]["ran"], false);

    // A causal model passes it, having checked past the data's length.
    let (json, _) = run_json(&[&fixture("tiny_lm.pt"), DATA, "--batch-size", "4"]);
    let c = &json["model"]["consistency"];
    assert!(c["padding_difference"].as_f64().unwrap() <= c["tolerance"].as_f64().unwrap());
    assert!(c["row_difference"].as_f64().unwrap() <= c["tolerance"].as_f64().unwrap());
    assert_eq!(c["rows_alone"], 2, "the longest row and the shortest");
}

#[test]
fn padding_and_untrained_prompt_tokens_are_counted_apart() {
    let (json, out) = run_json(&[&fixture("tiny_lm.pt"), DATA, "--batch-size", "4"]);
    assert_eq!(out.code, 0, "{out:?}");
    // The same counts, straight from the rows: targets t >= 1 of each batch of four.
    let rows = jsonl_rows(DATA);
    let (mut padding, mut prompt, mut trained) = (0u64, 0u64, 0u64);
    for batch in rows.chunks(4) {
        let width = batch
            .iter()
            .map(|r| r["input_ids"].as_array().unwrap().len())
            .max()
            .unwrap();
        for row in batch {
            let attention = row["attention_mask"].as_array().unwrap();
            let labels = row["labels"].as_array().unwrap();
            for t in 1..width {
                match (attention.get(t).and_then(Value::as_i64), labels.get(t)) {
                    (Some(1), Some(l)) if l.as_i64() != Some(-100) => trained += 1,
                    (Some(1), _) => prompt += 1,
                    _ => padding += 1,
                }
            }
        }
    }
    let d = &json["data"];
    assert!(prompt > 0 && padding > 0);
    assert_eq!(d["padding_target_positions"].as_u64(), Some(padding), "{d}");
    assert_eq!(d["padding_trained_positions"].as_u64(), Some(0), "{d}");
    assert_eq!(
        d["untrained_real_target_positions"].as_u64(),
        Some(prompt),
        "{d}"
    );
    assert_eq!(d["supervised_positions"].as_u64(), Some(trained), "{d}");
    let table = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        DATA,
        "--batch-size",
        "4",
    ]);
    let positions = (padding + prompt + trained) as f64;
    let line = format!(
        "padding {:.2}% of targets, untrained real tokens {:.2}%",
        padding as f64 / positions * 100.0,
        prompt as f64 / positions * 100.0
    );
    assert!(table.stdout.contains(&line), "{line}: {table:?}");
}

// ---- MODEL paths that are not TorchScript: what they are, and what to run ----

fn model_error(model: &str, expect: &[&str]) {
    let out = maskaudit(&["check", "--device", "cpu", model, DATA]);
    for e in expect {
        assert_usage_error(&out, e);
    }
}

#[test]
fn a_hugging_face_directory_gets_the_export_command() {
    let dir = TempDir::new("hf-dir");
    dir.write("config.json", "{\"model_type\": \"llama\"}");
    let path = dir.path().display().to_string();
    model_error(
        &path,
        &[
            "a Hugging Face model directory",
            &format!("make export MODEL={path} OUT=model.pt"),
        ],
    );
    let plain = TempDir::new("plain-dir");
    model_error(
        &plain.path().display().to_string(),
        &["a directory, not a model file"],
    );
}

#[test]
fn weights_and_pickles_are_named_for_what_they_are() {
    let dir = TempDir::new("weights");
    let mut st = 16u64.to_le_bytes().to_vec();
    st.extend_from_slice(b"{\"__metadata__\":{}}");
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, st).unwrap();
    model_error(
        &path.display().to_string(),
        &["safetensors weights", "make export"],
    );
    model_error(&odd("state_dict"), &["a state dict", "make export"]);
    model_error(&odd("pickled_model"), &["a pickled model", "make export"]);
    model_error(&odd("legacy_pickle"), &["a Python pickle", "make export"]);
}

#[test]
fn links_and_fifos_as_model_say_so() {
    let dir = TempDir::new("links");
    let (a, b) = (dir.path().join("a.pt"), dir.path().join("b.pt"));
    std::os::unix::fs::symlink(&b, &a).unwrap();
    std::os::unix::fs::symlink(&a, &b).unwrap();
    model_error(&a.display().to_string(), &["a loop of symbolic links"]);
    let dangling = dir.path().join("dangling.pt");
    std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
    model_error(
        &dangling.display().to_string(),
        &["a symbolic link to nothing"],
    );
    let fifo = dir.path().join("fifo.pt");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());
    model_error(&fifo.display().to_string(), &["not a regular file"]);
}
