//! Drives the real binary: `maskaudit lint` on a handmade file for each finding code and on
//! clean files, the JSON contract read with the consumer's own types, Parquet and gzip round
//! trips, the same checks inside `check`, the token view (snapshots, both colour modes) and
//! each kind of bad input.

mod common;

use common::*;
use serde::Deserialize;

/// The `lint` JSON contract as a consumer reads it (docs/json.md, "lint").
#[derive(Debug, Deserialize)]
struct LintJson {
    schema_version: u32,
    data: LintDataJson,
    statistics: serde_json::Value,
    findings: Vec<FindingJson>,
    verdict: String,
}

#[derive(Debug, Deserialize)]
struct LintDataJson {
    path: String,
    format: String,
    records: String,
    pad_id: Option<i64>,
    eos_id: Option<i64>,
    shifted: bool,
    batch_size: Option<usize>,
}

#[derive(Debug, Deserialize, PartialEq)]
struct FindingJson {
    code: String,
    severity: String,
    message: String,
    #[serde(default)]
    records: Vec<usize>,
}

fn lint_json(args: &[&str]) -> (LintJson, Output) {
    let mut all = vec!["lint", "--format", "json"];
    all.extend_from_slice(args);
    let out = maskaudit(&all);
    let json: LintJson = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the lint JSON contract ({e}): {out:?}"));
    (json, out)
}

fn codes(json: &LintJson) -> Vec<(&str, &str)> {
    json.findings
        .iter()
        .map(|f| (f.code.as_str(), f.severity.as_str()))
        .collect()
}

fn lint_fixture(name: &str) -> String {
    format!("fixtures/lint/{name}")
}

#[test]
fn each_code_has_a_handmade_file() {
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, &[&str], &[(&str, &str)], i32)] = &[
        (
            "empty_supervision.jsonl",
            &[],
            &[("empty-supervision", "warning")],
            0,
        ),
        (
            "eos_masked.jsonl",
            &["--pad-id", "2", "--eos-id", "2"],
            &[("pad-is-eos", "info"), ("eos-masked", "error")],
            1,
        ),
        (
            "no_eos.jsonl",
            &["--eos-id", "2"],
            &[("eos-missing", "warning")],
            0,
        ),
        (
            "pre_shifted.jsonl",
            &[],
            &[("labels-pre-shifted", "error")],
            1,
        ),
        (
            "clean_pretrain.jsonl",
            &["--shifted"],
            &[("labels-not-shifted", "error")],
            1,
        ),
        (
            "packed_boundary.jsonl",
            &[],
            &[("packed-boundary-supervised", "error")],
            1,
        ),
        (
            "mask_label_disagree.jsonl",
            &[],
            &[("mask-label-disagree", "warning")],
            0,
        ),
        (
            "padding_trained.jsonl",
            &["--pad-id", "0"],
            &[("padding-trained", "error")],
            1,
        ),
        (
            "negative_label.jsonl",
            &[],
            &[("unexpected-negative-label", "error")],
            1,
        ),
        (
            "mixed_mask_source.jsonl",
            &[],
            &[("mixed-mask-source", "warning")],
            0,
        ),
    ];
    for (file, args, expected, code) in cases {
        let path = lint_fixture(file);
        let mut all = vec![path.as_str()];
        all.extend_from_slice(args);
        let (json, out) = lint_json(&all);
        assert_eq!(codes(&json), *expected, "{file}: {out:?}");
        assert_eq!(out.code, *code, "{file}: {out:?}");
        assert_eq!(json.verdict, if *code == 0 { "pass" } else { "fail" });
        assert_eq!(out.stderr, "", "{file}");
    }
}

#[test]
fn findings_name_the_first_records() {
    let (json, _) = lint_json(&[&lint_fixture("empty_supervision.jsonl")]);
    let f = &json.findings[0];
    assert_eq!(f.records, vec![2]);
    assert!(
        f.message
            .starts_with("1 of 3 rows have no trained target after the shift (first at line 2)"),
        "{}",
        f.message
    );
    let (json, _) = lint_json(&[&lint_fixture("packed_boundary.jsonl")]);
    assert_eq!(json.findings[0].records, vec![1, 2]);
    assert_eq!(json.statistics["packing"]["supervised_boundaries"], 2);
    // A finding without records has no `records` key at all.
    let (_, out) = lint_json(&[&lint_fixture("mixed_mask_source.jsonl")]);
    let raw: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        raw["findings"][0].get("records").is_none(),
        "{}",
        out.stdout
    );
}

#[test]
fn clean_files_have_no_findings() {
    let torchtune = lint_fixture("clean_torchtune.jsonl");
    let shifted = lint_fixture("pre_shifted.jsonl");
    let sft = lint_fixture("clean_sft.jsonl");
    let packed = lint_fixture("clean_packed.jsonl");
    let pretrain = lint_fixture("clean_pretrain.jsonl");
    let ragged = fixture("ragged.jsonl");
    let padded = fixture("padded_labels.jsonl");
    let cases: &[&[&str]] = &[
        &[&sft, "--pad-id", "0", "--eos-id", "2"],
        &[&packed, "--pad-id", "0", "--eos-id", "2"],
        &[&pretrain, "--eos-id", "2"],
        &[
            &torchtune,
            "--input-field",
            "tokens",
            "--position-ids-field",
            "input_pos",
            "--eos-id",
            "2",
        ],
        &[&shifted, "--shifted", "--eos-id", "2"],
        &[
            &ragged,
            "--pad-id",
            "0",
            "--eos-id",
            "2",
            "--batch-size",
            "4",
        ],
        &[&padded, "--pad-id", "0", "--eos-id", "2"],
    ];
    for args in cases {
        let (json, out) = lint_json(args);
        assert_eq!(json.findings, vec![], "{args:?}");
        assert_eq!((out.code, json.verdict.as_str()), (0, "pass"), "{args:?}");
    }
    // The table says so too.
    let out = maskaudit(&["lint", &sft, "--pad-id", "0"]);
    assert_eq!(out.code, 0);
    assert!(!out.stdout.contains("warning["), "{}", out.stdout);
    assert!(out.stdout.ends_with("verdict: pass\n"), "{}", out.stdout);
}

#[test]
fn json_contract_and_statistics() {
    let (json, out) = lint_json(&[
        &lint_fixture("clean_sft.jsonl"),
        "--pad-id",
        "0",
        "--eos-id",
        "2",
        "--batch-size",
        "2",
    ]);
    assert_eq!(out.code, 0);
    assert_eq!(json.schema_version, 2);
    let d = &json.data;
    assert_eq!(d.path, "fixtures/lint/clean_sft.jsonl");
    assert_eq!((d.format.as_str(), d.records.as_str()), ("jsonl", "line"));
    assert_eq!((d.pad_id, d.eos_id, d.shifted), (Some(0), Some(2), false));
    assert_eq!(d.batch_size, Some(2));
    let s = &json.statistics;
    assert_eq!(s["rows"], 3);
    assert_eq!(s["tokens"], 28);
    assert_eq!(s["length"]["min"], 8);
    assert_eq!(s["length"]["median"], 9);
    assert_eq!(s["length"]["p95"], 11);
    assert_eq!(s["length"]["max"], 11);
    assert_eq!(s["content_length"]["max"], 10);
    assert_eq!(s["targets"], 25);
    assert_eq!(s["trained_targets"], 7);
    assert_eq!(s["rows_without_trained_target"], 0);
    assert_eq!(s["mask_source"], "labels");
    assert_eq!(s["padding"]["tokens"], 3);
    assert_eq!(s["padding"]["trained"], 0);
    assert_eq!(s["eos"]["targets"], 3);
    assert_eq!(s["eos"]["trained"], 3);
    assert_eq!(s["labels"]["next_position"], 0);
    assert_eq!(s["packing"]["rows"], 0);
    // Batches [8, 9] and [11]: 18 + 11 positions, 1 added.
    assert_eq!(s["batching"]["batches"], 2);
    assert_eq!(s["batching"]["positions"], 29);
    assert_eq!(s["batching"]["added_padding"], 1);
    let fraction = s["trained_fraction_per_row"]["max"].as_f64().unwrap();
    assert_close(fraction, 0.4, "per-row max");
    // Without --batch-size there is no batching statistic.
    let (json, _) = lint_json(&[&lint_fixture("clean_sft.jsonl")]);
    assert!(json.statistics["batching"].is_null());
    assert!(json.statistics["eos"].is_null());
}

#[test]
fn severity_overrides_set_the_exit_status() {
    let path = lint_fixture("padding_trained.jsonl");
    let (json, out) = lint_json(&[&path, "--pad-id", "0", "--allow", "padding-trained"]);
    assert_eq!((out.code, json.findings[0].severity.as_str()), (0, "info"));
    let path = lint_fixture("empty_supervision.jsonl");
    let (json, out) = lint_json(&[&path, "--deny", "empty-supervision"]);
    assert_eq!((out.code, json.verdict.as_str()), (1, "fail"));
}

// ---- formats ----

/// Lint output with what must differ between formats taken out.
fn comparable(json: &LintJson) -> (serde_json::Value, Vec<(String, String, Vec<usize>)>) {
    let findings = json
        .findings
        .iter()
        .map(|f| (f.code.clone(), f.severity.clone(), f.records.clone()))
        .collect();
    (json.statistics.clone(), findings)
}

#[test]
fn parquet_and_gzip_round_trips() {
    use parquet::basic::{Compression, ZstdLevel};
    let dir = TempDir::new("lint-formats");
    let mut files: Vec<String> = std::fs::read_dir("fixtures/lint")
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".jsonl") && !p.contains("torchtune"))
        .collect();
    files.sort();
    files.push(fixture("padded_labels.jsonl"));
    assert!(files.len() >= 13);
    for file in &files {
        let args = ["--pad-id", "0", "--eos-id", "2", "--batch-size", "2"];
        let mut all = vec![file.as_str()];
        all.extend_from_slice(&args);
        let (reference, _) = lint_json(&all);
        let rows = jsonl_rows(file);
        let stem = std::path::Path::new(file)
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();

        let gz = dir.path().join(format!("{stem}.jsonl.gz"));
        write_gzip(&gz, &std::fs::read(file).unwrap());
        let p64 = dir.path().join(format!("{stem}.parquet"));
        write_parquet(&p64, &rows, false, Compression::SNAPPY, 2);
        let p32 = dir.path().join(format!("{stem}-int32.parquet"));
        let zstd = Compression::ZSTD(ZstdLevel::default());
        write_parquet(&p32, &rows, true, zstd, 1000);

        for (path, format, records) in [
            (&gz, "jsonl.gz", "line"),
            (&p64, "parquet", "row"),
            (&p32, "parquet", "row"),
        ] {
            let path = path.display().to_string();
            let mut all = vec![path.as_str()];
            all.extend_from_slice(&args);
            let (json, out) = lint_json(&all);
            assert_eq!(json.data.format, format, "{path}");
            assert_eq!(json.data.records, records, "{path}");
            assert_eq!(json.data.path, path);
            assert_eq!(comparable(&json), comparable(&reference), "{path}: {out:?}");
            if format == "parquet" {
                for f in &json.findings {
                    assert!(!f.message.contains("first at line"), "{}", f.message);
                }
            }
        }
    }
}

#[test]
fn gzip_on_standard_input() {
    let dir = TempDir::new("lint-stdin-gz");
    let gz = dir.path().join("d.jsonl.gz");
    let file = lint_fixture("clean_sft.jsonl");
    write_gzip(&gz, &std::fs::read(&file).unwrap());
    let out = maskaudit_stdin(
        &["lint", "-", "--format", "json"],
        std::fs::read(&gz).unwrap(),
    );
    assert_eq!(out.code, 0, "{out:?}");
    let json: LintJson = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(
        (json.data.path.as_str(), json.data.format.as_str()),
        ("-", "jsonl.gz")
    );
    assert_eq!(json.statistics["rows"], 3);
}

// ---- check runs the same checks, and reads the same formats ----

#[derive(Debug, Deserialize)]
struct CheckJson {
    statistics: serde_json::Value,
    losses: serde_json::Value,
    findings: Vec<FindingJson>,
    data: serde_json::Value,
}

fn check_json(args: &[&str]) -> (CheckJson, Output) {
    let mut all = vec!["check", "--format", "json", "--device", "cpu"];
    all.extend_from_slice(args);
    let out = maskaudit(&all);
    let json: CheckJson = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the check JSON ({e}): {out:?}"));
    (json, out)
}

#[test]
fn check_includes_the_lint_findings_and_statistics() {
    let model = fixture("tiny_lm.pt");
    let (json, out) = check_json(&[
        &model,
        &lint_fixture("padding_trained.jsonl"),
        "--pad-id",
        "0",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(json
        .findings
        .iter()
        .any(|f| f.code == "padding-trained" && f.severity == "error"));
    assert_eq!(json.statistics["padding"]["trained"], 3);
    // --eos-id reaches the lint checks of check.
    let (json, out) = check_json(&[
        &model,
        &lint_fixture("eos_masked.jsonl"),
        "--pad-id",
        "2",
        "--eos-id",
        "2",
    ]);
    assert_eq!(out.code, 1, "{out:?}");
    assert!(json.findings.iter().any(|f| f.code == "eos-masked"));
    // Statistics agree with lint's.
    let (lint, _) = lint_json(&[
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
        "--batch-size",
        "8",
    ]);
    let (json, _) = check_json(&[&model, &fixture("ragged.jsonl"), "--pad-id", "0"]);
    assert_eq!(json.statistics, lint.statistics);
}

#[test]
fn check_reads_parquet_gzip_and_renamed_fields() {
    let dir = TempDir::new("check-formats");
    let model = fixture("tiny_lm.pt");
    let file = fixture("padded_labels.jsonl");
    let gz = dir.path().join("padded.jsonl.gz");
    write_gzip(&gz, &std::fs::read(&file).unwrap());
    let pq = dir.path().join("padded.parquet");
    write_parquet(
        &pq,
        &jsonl_rows(&file),
        true,
        parquet::basic::Compression::SNAPPY,
        5,
    );
    let (reference, _) = check_json(&[&model, &file, "--pad-id", "0", "--batch-size", "4"]);
    for path in [&gz, &pq] {
        let path = path.display().to_string();
        let (json, out) = check_json(&[&model, &path, "--pad-id", "0", "--batch-size", "4"]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(json.losses, reference.losses, "{path}");
        assert_eq!(json.data["rows"], reference.data["rows"]);
        assert_eq!(json.statistics, reference.statistics, "{path}");
    }
    // torchtune's names.
    let (json, out) = check_json(&[
        &model,
        &lint_fixture("clean_torchtune.jsonl"),
        "--input-field",
        "tokens",
        "--position-ids-field",
        "input_pos",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(json.statistics["packing"]["documents"], 2);
    // Ragged Parquet rows without --pad-id name the row.
    let ragged = dir.path().join("ragged.parquet");
    write_parquet(
        &ragged,
        &jsonl_rows(&fixture("ragged.jsonl")),
        false,
        parquet::basic::Compression::UNCOMPRESSED,
        10,
    );
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &model,
        &ragged.display().to_string(),
    ]);
    assert_usage_error(
        &out,
        "ragged.parquet:row 1: input_ids: row has 9 tokens but the row at row 2 has 24",
    );
}

// ---- token view ----

/// Escape bytes made visible, so a snapshot reads as text.
fn visible(s: &str) -> String {
    s.replace('\u{1b}', "\\e")
}

fn view(args: &[&str]) -> String {
    let mut all = vec!["lint"];
    all.extend_from_slice(args);
    let out = maskaudit(&all);
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(out.stderr, "");
    visible(&out.stdout)
}

#[test]
fn token_view_plain() {
    let sft = lint_fixture("clean_sft.jsonl");
    let out = view(&[&sft, "--pad-id", "0", "--show", "3", "--color", "never"]);
    assert!(out.contains("1 4 6 5 [7 2] 0 0\n"), "{out}");
    insta::assert_snapshot!("view_ids_plain", out);
}

#[test]
fn token_view_colour() {
    let sft = lint_fixture("clean_sft.jsonl");
    let out = view(&[&sft, "--pad-id", "0", "--show", "3", "--color", "always"]);
    assert!(out.contains("\\e[32m"), "{out}");
    assert!(!out.contains("[7 2]"), "{out}");
    insta::assert_snapshot!("view_ids_colour", out);
}

#[test]
fn token_view_decoded_through_a_tokenizer() {
    let tokenizer = lint_fixture("tokenizer.json");
    let sft = lint_fixture("clean_sft.jsonl");
    let packed = lint_fixture("packed_boundary.jsonl");
    let shifted = lint_fixture("pre_shifted.jsonl");
    for color in ["never", "always"] {
        let mut out = String::new();
        for (file, extra) in [
            (&sft, &["--pad-id", "0"][..]),
            (&packed, &[][..]),
            (&shifted, &["--shifted"][..]),
        ] {
            let mut args = vec![
                file.as_str(),
                "--show",
                "2",
                "--tokenizer",
                &tokenizer,
                "--color",
                color,
            ];
            args.extend_from_slice(extra);
            let mut all = vec!["lint"];
            all.extend_from_slice(&args);
            let run = maskaudit(&all);
            let strips: String = run.stdout.split("maskaudit lint:").next().unwrap().into();
            out.push_str(&format!(
                "$ maskaudit lint {}\n{}",
                args.join(" "),
                visible(&strips)
            ));
        }
        if color == "never" {
            assert!(
                out.contains("<s> user: hello assistant:[ hi </s>] <pad> <pad>"),
                "{out}"
            );
        }
        insta::assert_snapshot!(format!("view_tokenizer_{color}"), out);
    }
}

#[test]
fn colour_follows_the_terminal_and_no_color() {
    let sft = lint_fixture("clean_sft.jsonl");
    let args = ["lint", sft.as_str(), "--show", "1"];
    // Not a terminal: auto is plain.
    let out = maskaudit(&args);
    assert!(
        !out.stdout.contains('\u{1b}') && out.stdout.contains("[7 2]"),
        "{out:?}"
    );
    // CLICOLOR_FORCE forces colour under auto; NO_COLOR wins over it.
    let out = maskaudit_env(&args, &[("CLICOLOR_FORCE", "1")]);
    assert!(out.stdout.contains('\u{1b}'), "{out:?}");
    let out = maskaudit_env(&args, &[("CLICOLOR_FORCE", "1"), ("NO_COLOR", "1")]);
    assert!(!out.stdout.contains('\u{1b}'), "{out:?}");
    // An explicit --color always wins over NO_COLOR.
    let mut always = args.to_vec();
    always.extend(["--color", "always"]);
    let out = maskaudit_env(&always, &[("NO_COLOR", "1")]);
    assert!(out.stdout.contains('\u{1b}'), "{out:?}");
}

// ---- bad input: one line on stderr, exit 2 ----

#[test]
fn bad_jsonl_and_gzip() {
    let dir = TempDir::new("lint-bad");
    let path = dir.write("d.jsonl", "{\"input_ids\":[1,2]}\n{\"input_ids\":[1,\n");
    assert_usage_error(&maskaudit(&["lint", &path]), "d.jsonl:2: not a JSON object");
    let path = dir.write(
        "p.jsonl",
        "{\"input_ids\":[1,2,3],\"position_ids\":[0,1]}\n",
    );
    assert_usage_error(
        &maskaudit(&["lint", &path]),
        "p.jsonl:1: position_ids: has 2 entries but input_ids has 3",
    );
    let path = dir.write("s.jsonl", "{\"input_ids\":[1,2,3],\"seq_lens\":[2,2]}\n");
    assert_usage_error(
        &maskaudit(&["lint", &path]),
        "s.jsonl:1: seq_lens: the lengths sum to 4 but input_ids has 3 tokens",
    );
    let empty = dir.write("e.jsonl", "\n");
    assert_usage_error(
        &maskaudit(&["lint", &empty]),
        "e.jsonl: no rows: the dataset is empty",
    );
    // A gzip stream cut short.
    let gz = dir.path().join("cut.jsonl.gz");
    write_gzip(&gz, &std::fs::read(fixture("ragged.jsonl")).unwrap());
    let bytes = std::fs::read(&gz).unwrap();
    std::fs::write(&gz, &bytes[..bytes.len() / 2]).unwrap();
    let out = maskaudit(&["lint", &gz.display().to_string()]);
    assert_usage_error(&out, "cut.jsonl.gz:");
    assert_usage_error(
        &maskaudit(&["lint", "no/such.parquet"]),
        "no/such.parquet: No such file or directory",
    );
}

#[test]
fn bad_parquet() {
    use parquet::basic::Compression;
    let dir = TempDir::new("lint-bad-parquet");
    let rows: Vec<serde_json::Value> = vec![
        serde_json::json!({"input_ids": [1, 2, 3]}),
        serde_json::json!({"input_ids": [1, null, 3]}),
    ];
    let nulls = dir.path().join("nulls.parquet");
    write_parquet(&nulls, &rows, false, Compression::UNCOMPRESSED, 1);
    assert_usage_error(
        &maskaudit(&["lint", &nulls.display().to_string()]),
        "nulls.parquet:row 2: input_ids: null at index 1: expected an integer",
    );
    let rows = vec![serde_json::json!({"tokens": [1, 2, 3]})];
    let renamed = dir.path().join("tokens.parquet");
    write_parquet(&renamed, &rows, false, Compression::UNCOMPRESSED, 1);
    let renamed = renamed.display().to_string();
    assert_usage_error(
        &maskaudit(&["lint", &renamed]),
        "tokens.parquet: input_ids: no such column (columns: text, tokens); --input-field names it",
    );
    let (json, out) = lint_json(&[&renamed, "--input-field", "tokens"]);
    assert_eq!((out.code, json.statistics["tokens"].as_u64()), (0, Some(3)));
    let rows = vec![serde_json::json!({"input_ids": [1, 2, 3], "labels": [1, 2]})];
    let short = dir.path().join("short.parquet");
    write_parquet(&short, &rows, false, Compression::UNCOMPRESSED, 1);
    assert_usage_error(
        &maskaudit(&["lint", &short.display().to_string()]),
        "short.parquet:row 1: labels: has 2 entries but input_ids has 3",
    );
    let fake = dir.write("fake.parquet", "PAR1 but not really");
    assert_usage_error(
        &maskaudit(&["lint", &fake]),
        "fake.parquet: not a readable Parquet file",
    );
    let out = maskaudit_stdin(&["lint", "-"], std::fs::read(&short).unwrap());
    assert_usage_error(&out, "-: Parquet cannot be read from standard input");
}

#[test]
fn bad_options_and_tokenizers() {
    let sft = lint_fixture("clean_sft.jsonl");
    assert_usage_error(
        &maskaudit(&["lint", &sft, "--show", "2", "--format", "json"]),
        "--show prints rows for people",
    );
    assert_usage_error(
        &maskaudit(&[
            "lint",
            &sft,
            "--show",
            "1",
            "--tokenizer",
            "no/tokenizer.json",
        ]),
        "no/tokenizer.json: no such file",
    );
    assert_usage_error(
        &maskaudit(&["lint", &sft, "--show", "1", "--tokenizer", &sft]),
        "clean_sft.jsonl: not a tokenizer.json",
    );
    // --tokenizer needs --show: a clap usage error, exit 2.
    let out = maskaudit(&["lint", &sft, "--tokenizer", &lint_fixture("tokenizer.json")]);
    assert_eq!(out.code, 2, "{out:?}");
    let out = maskaudit(&["lint", &sft, "--batch-size", "0"]);
    assert_eq!(out.code, 2, "{out:?}");
}

#[test]
fn every_new_code_is_explained() {
    let out = maskaudit(&["explain", "all"]);
    assert_eq!(out.code, 0);
    for code in [
        "empty-supervision",
        "eos-masked",
        "eos-missing",
        "pad-is-eos",
        "labels-pre-shifted",
        "labels-not-shifted",
        "packed-boundary-supervised",
        "mask-label-disagree",
        "padding-trained",
        "unexpected-negative-label",
    ] {
        assert!(out.stdout.contains(code), "{code} in explain all");
        let long = maskaudit(&["explain", code]);
        assert_eq!(long.code, 0, "{long:?}");
        assert!(long.stdout.starts_with(&format!("{code}: ")), "{long:?}");
        assert!(
            long.stdout.contains("Fix") || long.stdout.contains("fix"),
            "{code}"
        );
        assert!(
            long.stdout.contains("-100") || long.stdout.contains("eos"),
            "{code}"
        );
    }
}
