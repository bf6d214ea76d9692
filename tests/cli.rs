//! Drives the real binary: numbers against PyTorch, exit codes, the JSON contract read with
//! the consumer's own types, the table, and one test for each kind of bad input.

mod common;

use common::*;
use serde::Deserialize;

/// The JSON contract as a consumer reads it (docs/json.md).
#[derive(Debug, Deserialize)]
struct CheckJson {
    schema_version: u32,
    model: ModelJson,
    data: DataJson,
    losses: LossesJson,
    contamination: Option<ContaminationJson>,
    findings: Vec<FindingJson>,
    verdict: String,
}

#[derive(Debug, Deserialize)]
struct ModelJson {
    path: String,
    vocab_size: i64,
    device: String,
}

#[derive(Debug, Deserialize)]
struct DataJson {
    path: String,
    rows: u64,
    positions: u64,
    supervised_positions: u64,
    padding_fraction: f64,
    padding_target_positions: u64,
    padding_trained_positions: u64,
    untrained_real_target_positions: u64,
    mask_source: String,
}

#[derive(Debug, Deserialize)]
struct LossesJson {
    all_positions_mean: f64,
    masked_token_mean: f64,
    masked_sum_over_all_positions: f64,
    sequence_mean: f64,
    batch_mean_of_means: f64,
    trained_and_padding_mean: f64,
}

#[derive(Debug, Deserialize)]
struct ContaminationJson {
    absolute: f64,
    relative: f64,
}

#[derive(Debug, Deserialize)]
struct FindingJson {
    code: String,
    severity: String,
    message: String,
}

fn check_json(args: &[&str]) -> (CheckJson, Output) {
    let mut all = vec!["check", "--format", "json", "--device", "cpu"];
    all.extend_from_slice(args);
    let out = maskaudit(&all);
    let json: CheckJson = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON contract ({e}): {out:?}"));
    (json, out)
}

/// Padding and untrained real targets as the PyTorch reference counts them (the same rule).
fn assert_target_counts(data: &DataJson, case: &serde_json::Value, name: &str) {
    let counts = [
        (data.padding_target_positions, "padding_target_positions"),
        (data.padding_trained_positions, "padding_trained_positions"),
        (
            data.untrained_real_target_positions,
            "untrained_real_target_positions",
        ),
    ];
    for (got, key) in counts {
        assert_eq!(got, case[key].as_u64().unwrap(), "{name}.{key}");
    }
}

#[test]
fn aggregates_match_pytorch_for_every_fixture_case() {
    let expected = expected();
    let cases = expected["cases"].as_array().expect("cases");
    assert!(cases.len() >= 6, "the generator wrote the fixture cases");
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let model = fixture(case["model"].as_str().unwrap());
        let data = fixture(case["data"].as_str().unwrap());
        let batch = case["batch_size"].as_u64().unwrap().to_string();
        let pad = case["pad_id"].as_i64().unwrap().to_string();
        let (json, out) = check_json(&[&model, &data, "--batch-size", &batch, "--pad-id", &pad]);
        let exit_code = case["exit_code"].as_i64().unwrap_or(0) as i32;
        assert_eq!(out.code, exit_code, "{name}: {out:?}");
        assert_eq!(json.schema_version, 2);
        assert_eq!(
            json.model.vocab_size,
            expected["vocab_size"].as_i64().unwrap()
        );
        assert_eq!(json.model.device, "cpu");
        assert_eq!(json.model.path, model);
        assert_eq!(json.data.path, data);
        assert_eq!(json.data.rows, case["rows"].as_u64().unwrap(), "{name}");
        assert_eq!(
            json.data.positions,
            case["positions"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            json.data.supervised_positions,
            case["supervised_positions"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            json.data.mask_source,
            case["mask_source"].as_str().unwrap(),
            "{name}"
        );
        assert_target_counts(&json.data, case, name);
        assert_close(
            json.data.padding_fraction,
            case["padding_fraction"].as_f64().unwrap(),
            name,
        );
        let l = &case["losses"];
        let pairs = [
            (json.losses.all_positions_mean, "all_positions_mean"),
            (json.losses.masked_token_mean, "masked_token_mean"),
            (
                json.losses.masked_sum_over_all_positions,
                "masked_sum_over_all_positions",
            ),
            (json.losses.sequence_mean, "sequence_mean"),
            (json.losses.batch_mean_of_means, "batch_mean_of_means"),
            (
                json.losses.trained_and_padding_mean,
                "trained_and_padding_mean",
            ),
        ];
        for (got, key) in pairs {
            assert_close(got, l[key].as_f64().unwrap(), &format!("{name}.{key}"));
        }
        let c = json.contamination.expect("contamination");
        assert_close(
            c.absolute,
            case["contamination"]["absolute"].as_f64().unwrap(),
            name,
        );
        assert_close(
            c.relative,
            case["contamination"]["relative"].as_f64().unwrap(),
            name,
        );
    }
}

#[test]
fn max_contamination_sets_the_exit_status() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    let (json, out) = check_json(&[
        &model,
        &data,
        "--pad-id",
        "0",
        "--max-contamination",
        "0.001",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(json.verdict, "fail");
    let f = json
        .findings
        .iter()
        .find(|f| f.code == "padding-contamination")
        .expect("contamination finding");
    assert_eq!(f.severity, "error");
    assert!(f.message.contains("--max-contamination"), "{}", f.message);

    let (json, out) = check_json(&[&model, &data, "--pad-id", "0", "--max-contamination", "100"]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json.verdict, "pass");

    // --allow turns the error back into information.
    let (json, out) = check_json(&[
        &model,
        &data,
        "--pad-id",
        "0",
        "--max-contamination",
        "0.001",
        "--allow",
        "padding-contamination",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json.findings[0].severity, "info");
}

#[test]
fn the_fixture_model_makes_padding_visible() {
    // The trained fixture learned pad→pad, so a loss with padding reads too low.
    let (json, _) = check_json(&[
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
    ]);
    assert!(json.contamination.unwrap().relative < -0.05);
    assert!(json.data.padding_fraction > 0.1);
    // Without a loss nobody computed the contaminated value: information, not a warning.
    let f = &json.findings[0];
    assert_eq!(
        (f.code.as_str(), f.severity.as_str()),
        ("padding-contamination", "info")
    );
    assert!(f.message.contains("no --loss"), "{}", f.message);
}

/// Correct pipelines, each as `lint` and `check` see it: no warning and no error; information
/// only where it is true (`pad-is-eos` when pad == eos, `padding-contamination` as what a loss
/// that does not mask padding would read, `no-padding` without padding).
#[test]
fn correct_setups_get_no_warning_and_no_error() {
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, &[&str], &[&str])] = &[
        // SFT: prompt at -100, right padding with attention 0.
        (
            "clean_sft.jsonl",
            &["--pad-id", "0", "--eos-id", "2"],
            &["padding-contamination"],
        ),
        // SFT with pad == eos, the first EOS trained.
        (
            "clean_sft_pad_eos.jsonl",
            &["--pad-id", "2", "--eos-id", "2"],
            &["pad-is-eos", "padding-contamination"],
        ),
        // Pretraining: labels = input_ids, -100 at padding (with and without attention).
        (
            "clean_pretrain_padded.jsonl",
            &["--pad-id", "0", "--eos-id", "2"],
            &["padding-contamination"],
        ),
        // Padding-free packing (trl): position_ids restarting at 0, -100 at each start.
        (
            "clean_padding_free.jsonl",
            &["--pad-id", "0", "--eos-id", "2"],
            // tiny_lm.pt takes no position ids: its documents are run one by one.
            &["no-padding", "packed-rows-split"],
        ),
    ];
    let model = fixture("tiny_lm.pt");
    let loss = fixture("losses/correct_labels.pt");
    for (file, args, infos) in cases {
        let data = format!("fixtures/lint/{file}");
        let mut lint = vec!["lint", "--format", "json", data.as_str()];
        lint.extend_from_slice(args);
        let mut check = vec!["check", "--format", "json", "--device", "cpu"];
        check.extend_from_slice(&["--batch-size", "2", &model, &data]);
        check.extend_from_slice(args);
        // With a correct Hugging Face-style loss too: it takes no padding in.
        let mut with_loss = check.clone();
        with_loss.extend_from_slice(&["--loss", &loss]);
        for (command, args) in [
            ("lint", &lint),
            ("check", &check),
            ("check --loss", &with_loss),
        ] {
            let out = maskaudit(args);
            assert_eq!(out.code, 0, "{command} {file}: {out:?}");
            let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
            let found: Vec<(String, String)> = json["findings"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| {
                    let s = |k: &str| f[k].as_str().unwrap().to_string();
                    (s("code"), s("severity"))
                })
                .collect();
            for (code, severity) in &found {
                assert_eq!(severity, "info", "{command} {file}: {found:?}");
                assert!(
                    infos.contains(&code.as_str()),
                    "{command} {file}: {code} is not expected: {found:?}"
                );
            }
        }
    }
}

/// The most common collator bug: labels = input_ids, attention_mask 0 at the padding. The
/// numbers agree with each other: padding targets counted once, all trained, nothing wrapped.
#[test]
fn padding_the_labels_train_is_counted_once() {
    let data = "fixtures/lint/padding_trained_attention.jsonl";
    let model = fixture("tiny_lm.pt");
    let (json, out) = check_json(&[&model, data, "--pad-id", "0", "--batch-size", "4"]);
    assert_eq!(out.code, 1, "{out:?}");
    // Rows of 9, 9 and 9 tokens: 24 targets; padding: tokens 6..9 of row 1, 7..9 of row 3.
    let d = &json.data;
    assert_eq!(d.positions, 24);
    assert_eq!(d.supervised_positions, 24);
    assert_eq!(d.padding_target_positions, 5);
    assert_eq!(d.padding_trained_positions, 5);
    assert_eq!(d.untrained_real_target_positions, 0);
    assert_close(d.padding_fraction, 5.0 / 24.0, "padding_fraction");
    let codes: Vec<(&str, &str)> = json
        .findings
        .iter()
        .map(|f| (f.code.as_str(), f.severity.as_str()))
        .collect();
    assert!(codes.contains(&("padding-trained", "error")), "{codes:?}");
    assert!(!codes.iter().any(|(c, _)| *c == "no-padding"), "{codes:?}");
    let f = json
        .findings
        .iter()
        .find(|f| f.code == "padding-contamination")
        .expect("contamination finding");
    assert!(
        f.message.contains("trained by the mask itself"),
        "{}",
        f.message
    );
    let table = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &model,
        data,
        "--pad-id",
        "0",
        "--batch-size",
        "4",
    ]);
    assert!(
        table
            .stdout
            .contains("padding 20.83% of targets (all trained), untrained real tokens 0.00%"),
        "{table:?}"
    );
    // lint counts the same padding.
    let lint = maskaudit(&["lint", "--format", "json", data, "--pad-id", "0"]);
    let s: serde_json::Value = serde_json::from_str(&lint.stdout).unwrap();
    assert_eq!(s["statistics"]["padding"]["trained"], 5);
    assert_eq!(s["statistics"]["padding"]["tokens"], 5);
}

/// Left padding, by attention mask and by pad id, is padding for `lint` and `check` alike.
#[test]
fn left_padding_is_counted_by_lint_and_check_alike() {
    let data = "fixtures/lint/left_padded.jsonl";
    let lint = maskaudit(&["lint", "--format", "json", data, "--pad-id", "0"]);
    let s: serde_json::Value = serde_json::from_str(&lint.stdout).unwrap();
    let padding = &s["statistics"]["padding"];
    assert_eq!(
        (
            padding["rows"].as_u64(),
            padding["left_padded_rows"].as_u64()
        ),
        (Some(2), Some(2)),
        "{padding}"
    );
    // Row 1's labels train its left padding (tokens 1 and 2 are targets).
    assert_eq!(padding["trained"], 2);
    let (json, out) = check_json(&[&fixture("tiny_lm.pt"), data, "--pad-id", "0"]);
    assert_eq!(out.code, 1, "{out:?}");
    // Targets 1..9 of each row: row 1 has 2 padding targets, row 3 one (token 1).
    assert_eq!(json.data.padding_target_positions, 3);
    assert_eq!(json.data.padding_trained_positions, 2);
}

#[test]
fn standard_input_is_read_with_a_dash() {
    let data = std::fs::read(fixture("ragged.jsonl")).unwrap();
    let out = maskaudit_stdin(
        &[
            "check",
            "--format",
            "json",
            "--device",
            "cpu",
            &fixture("tiny_lm.pt"),
            "-",
            "--pad-id",
            "0",
        ],
        data,
    );
    assert_eq!(out.code, 0, "{out:?}");
    let from_stdin: CheckJson = serde_json::from_str(&out.stdout).unwrap();
    let (from_file, _) = check_json(&[
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
    ]);
    assert_eq!(from_stdin.data.path, "-");
    assert_eq!(
        from_stdin.losses.masked_token_mean,
        from_file.losses.masked_token_mean
    );
}

#[test]
fn table_output_snapshot() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
        "--batch-size",
        "4",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(
        out.stderr, "",
        "no progress bar when stderr is not a terminal"
    );
    insta::assert_snapshot!("check_table", out.stdout);
}

// ---- bad input: one line on stderr, exit 2 ----

fn bad_data(name: &str, contents: &str, extra: &[&str], expect: &str) {
    let dir = TempDir::new(name);
    let path = dir.write("data.jsonl", contents);
    let mut args = vec!["check", "--device", "cpu"];
    let model = fixture("tiny_lm.pt");
    args.push(&model);
    args.push(&path);
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    assert_usage_error(&out, expect);
}

#[test]
fn malformed_json_names_file_and_line() {
    bad_data(
        "malformed",
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2\n",
        &[],
        "data.jsonl:2: not a JSON object",
    );
}

#[test]
fn non_integer_id_names_the_field() {
    bad_data(
        "nonint",
        "{\"input_ids\":[1,2.5,3]}\n",
        &[],
        "data.jsonl:1: input_ids: expected an array of integers",
    );
    bad_data(
        "string_id",
        "{\"input_ids\":[1,\"a\"]}\n",
        &[],
        "data.jsonl:1: input_ids: expected an array of integers",
    );
}

#[test]
fn negative_id_is_rejected() {
    bad_data(
        "negative",
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,-7,3]}\n",
        &[],
        "data.jsonl:2: input_ids: negative token id -7 at index 1",
    );
}

#[test]
fn misaligned_labels_and_mask_are_rejected() {
    bad_data(
        "labels_len",
        "{\"input_ids\":[1,2,3],\"labels\":[1,2]}\n",
        &[],
        "data.jsonl:1: labels: has 2 entries but input_ids has 3",
    );
    bad_data(
        "mask_len",
        "{\"input_ids\":[1,2,3],\"loss_mask\":[1,1,1,1]}\n",
        &[],
        "data.jsonl:1: loss_mask: has 4 entries but input_ids has 3",
    );
}

#[test]
fn id_outside_the_vocabulary_is_caught_before_libtorch() {
    bad_data(
        "vocab",
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2,48]}\n",
        &[],
        "data.jsonl:2: input_ids: token id 48 at index 2 is outside the model's vocabulary (size 48)",
    );
}

#[test]
fn a_pad_id_outside_the_vocabulary_is_caught_before_libtorch() {
    bad_data(
        "pad_vocab",
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1]}\n",
        &["--pad-id", "48"],
        "--pad-id 48 is outside the model's vocabulary (size 48)",
    );
}

#[test]
fn empty_dataset_is_an_error() {
    bad_data(
        "empty",
        "",
        &[],
        "data.jsonl: no rows: the dataset is empty",
    );
    bad_data(
        "blank",
        "\n  \n",
        &[],
        "data.jsonl: no rows: the dataset is empty",
    );
}

#[test]
fn ragged_rows_need_a_pad_id() {
    bad_data(
        "ragged",
        "{\"input_ids\":[1,2,3]}\n{\"input_ids\":[1,2]}\n",
        &[],
        "--pad-id",
    );
}

#[test]
fn missing_files_are_usage_errors() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        "no/such.jsonl",
    ]);
    assert_usage_error(&out, "no/such.jsonl: No such file or directory");
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        "no/model.pt",
        &fixture("ragged.jsonl"),
    ]);
    assert_usage_error(&out, "no/model.pt: no such file");
}

#[test]
fn a_file_that_is_not_torchscript_is_rejected() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("not_a_model.pt"),
        &fixture("ragged.jsonl"),
    ]);
    assert_usage_error(&out, "not_a_model.pt: not a TorchScript module");
}

#[test]
fn an_unsupported_model_output_is_rejected() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("bad_output.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
    ]);
    assert_usage_error(&out, "bad_output.pt: unsupported output");
}

#[test]
fn nan_logits_are_rejected() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("nan_logits.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
    ]);
    assert_usage_error(
        &out,
        "NaN or infinite logits for the batch starting at line 1",
    );
}

#[test]
fn cuda_without_a_gpu_is_a_usage_error() {
    if tch::Cuda::is_available() {
        return;
    }
    let out = maskaudit(&[
        "check",
        "--device",
        "cuda",
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
    ]);
    assert_usage_error(&out, "--device cuda: CUDA is not available");
}

#[test]
fn bad_arguments_exit_2() {
    let out = maskaudit(&["check", "--batch-size", "0", "a", "b"]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = maskaudit(&["check", "--deny", "no-such-code", "a", "b"]);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(out.stderr.contains("unknown finding code"), "{out:?}");
}
