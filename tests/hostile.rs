//! Hostile input through the real binary (issue 10): no panic, no abort, bounded memory, no
//! silent pass. Each case asserts the exit status and the one line on standard error.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ---- helpers, for every section ----

/// The single line of an error (asserted to be exactly one, exit 2, no panic).
fn error_line(out: &Output) -> &str {
    assert_usage_error(out, "");
    out.stderr.trim_end()
}

/// Runs maskaudit with a watchdog: a run that blocks fails the test instead of hanging it.
fn maskaudit_watched(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn maskaudit");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("maskaudit {args:?} still running after {limit:?}: it blocked");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    Output {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs maskaudit with standard output on a pipe whose reading end is already closed.
fn maskaudit_into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("run maskaudit");
    Output {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::new(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn check_cpu(model: &str, data: &str, extra: &[&str]) -> Output {
    let mut args = vec!["check", "--device", "cpu", "--format", "json", model, data];
    args.extend_from_slice(extra);
    maskaudit(&args)
}

fn finding_codes(stdout: &str) -> Vec<(String, String)> {
    let json: serde_json::Value = serde_json::from_str(stdout).expect("JSON report");
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_string(),
                f["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

// ---- data and command line ----

/// Parquet files on which the parquet crate panics (found by fuzz/parquet;
/// fixtures/hostile/README.md): an error naming the file and row, exit 2, no backtrace.
#[test]
fn corrupt_parquet_is_an_error_not_a_panic() {
    let cases = [
        (
            "dictionary_decoder_unset",
            "row 16",
            "Decoder for dict should have been set",
        ),
        (
            "index_out_of_bounds",
            "row 7",
            "index out of bounds: the len is 32 but the index is 32",
        ),
        (
            "list_type_assertion",
            "row 1",
            "Invalid list type GroupType",
        ),
        (
            "negative_column_start",
            "row 16",
            "column start and length should not be negative",
        ),
    ];
    for (name, row, panic) in cases {
        let file = fixture(&format!("hostile/parquet/{name}.parquet"));
        let lint = maskaudit(&["lint", &file]);
        let check = check_cpu(&fixture("tiny_lm.pt"), &file, &["--pad-id", "0"]);
        for out in [lint, check] {
            let line = error_line(&out);
            let want = format!("{file}:{row}: cannot decode: the decoder failed on corrupt data (");
            assert!(line.contains(&want), "{line}");
            assert!(line.contains(panic), "{line}");
            assert!(!line.contains("RUST_BACKTRACE"), "{line}");
        }
    }
}

/// A 4.7 kB footer whose schema declares about 790 million children: the parquet crate asks
/// for 6.3 GB for them (found by fuzz/parquet, as an out-of-memory under libFuzzer's malloc
/// limit). The allocator maps it without touching it, so the file ends as an input error with
/// the resident memory of any run.
#[test]
fn a_schema_declaring_millions_of_children_is_an_input_error() {
    let file = fixture("hostile/parquet/schema_children_count.parquet");
    let lint = maskaudit(&["lint", &file]);
    let check = check_cpu(&fixture("tiny_lm.pt"), &file, &["--pad-id", "0"]);
    for out in [lint, check] {
        let line = error_line(&out);
        assert!(
            line.contains("schema_children_count.parquet: not a readable Parquet file"),
            "{line}"
        );
    }
}

/// A 6 kB file whose dictionary page declares 1.7 billion values: the parquet crate sized
/// the dictionary by that count and filled 14 GB before failing. Refused before decoding.
#[test]
fn a_dictionary_larger_than_its_page_is_refused() {
    let file = fixture("hostile/parquet/dictionary_count_oom.parquet");
    let line = error_line(&maskaudit(&["lint", &file])).to_string();
    assert!(
        line.ends_with(&format!(
            "{file}:row 16: cannot decode: Parquet error: corrupt dictionary page: 1778384896 values declared in 200 bytes"
        )),
        "{line}"
    );
}

/// Files the parquet crate spins on (found by fuzz/parquet): a footer whose Thrift list of
/// booleans it skips one by one (seconds in release, 18 s in a debug build), and a page header
/// it loops on (still running after 100 s). The stall watchdog ends both as input errors; its
/// limit is cut to 1 s here.
#[test]
fn files_the_decoder_stalls_on_end_as_input_errors() {
    for (file, expect) in [
        (
            "thrift_skip_loop.parquet",
            "thrift_skip_loop.parquet: not a readable Parquet file: the decoder stalls on its metadata (no progress for 1 s)",
        ),
        (
            "page_header_skip.parquet",
            "cannot decode: the decoder stalls on corrupt data (no progress for 1 s)",
        ),
    ] {
        let path = fixture(&format!("hostile/slow/{file}"));
        let started = Instant::now();
        let out = maskaudit_env(&["lint", &path], &[("MASKAUDIT_DECODE_STALL_SECS", "1")]);
        assert!(error_line(&out).ends_with(expect), "{file}: {out:?}");
        assert!(started.elapsed() < Duration::from_secs(60), "{file}");
    }
}

#[test]
fn every_parquet_codec_reads() {
    let reference = maskaudit(&["lint", "--format", "json", &fixture("ragged.jsonl")]);
    assert_eq!(reference.code, 0, "{reference:?}");
    let want: serde_json::Value = serde_json::from_str(&reference.stdout).unwrap();
    for codec in [
        "uncompressed",
        "snappy",
        "gzip",
        "lz4",
        "lz4_raw",
        "brotli",
        "zstd",
    ] {
        let file = fixture(&format!("hostile/codecs/{codec}.parquet"));
        let out = maskaudit(&["lint", "--format", "json", &file]);
        assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{codec}: {out:?}");
        let got: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(got["statistics"], want["statistics"], "{codec}");
        assert_eq!(got["data"]["format"], "parquet");
    }
}

/// Writes the codec fixtures: `cargo test --test hostile -- --ignored write_codec_fixtures`.
#[test]
#[ignore]
fn write_codec_fixtures() {
    use parquet::basic::{BrotliLevel, Compression, GzipLevel, ZstdLevel};
    let rows = jsonl_rows(&fixture("ragged.jsonl"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hostile/codecs");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, codec) in [
        ("uncompressed", Compression::UNCOMPRESSED),
        ("snappy", Compression::SNAPPY),
        ("gzip", Compression::GZIP(GzipLevel::default())),
        ("lz4", Compression::LZ4),
        ("lz4_raw", Compression::LZ4_RAW),
        ("brotli", Compression::BROTLI(BrotliLevel::default())),
        ("zstd", Compression::ZSTD(ZstdLevel::default())),
    ] {
        write_parquet(&dir.join(format!("{name}.parquet")), &rows, false, codec, 3);
    }
}

/// Writes the Parquet seeds of fuzz/parquet beside the codec files:
/// `cargo test --test hostile -- --ignored write_fuzz_parquet_seeds`.
#[test]
#[ignore]
fn write_fuzz_parquet_seeds() {
    use parquet::basic::Compression;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/parquet");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, int32) in [
        ("clean_sft", false),
        ("clean_packed", true),
        ("clean_torchtune", false),
    ] {
        let rows = jsonl_rows(&format!("fixtures/lint/{name}.jsonl"));
        let file = dir.join(format!("{name}.parquet"));
        write_parquet(&file, &rows, int32, Compression::UNCOMPRESSED, 2);
    }
    let rows = vec![
        serde_json::json!({"input_ids": [1, 2, 3], "labels": [-100, null, 3]}),
        serde_json::json!({"input_ids": [], "loss_mask": [1]}),
        serde_json::json!({"labels": [1]}),
    ];
    write_parquet(
        &dir.join("nulls.parquet"),
        &rows,
        false,
        Compression::SNAPPY,
        1,
    );
}

#[test]
fn a_line_longer_than_the_limit_stops_reading() {
    // /dev/zero has no newline: without the limit this grew without end.
    let out = maskaudit(&["lint", "/dev/zero", "--max-line-bytes", "1000"]);
    assert_eq!(
        error_line(&out),
        "maskaudit: error: /dev/zero:1: line longer than 1000 bytes (--max-line-bytes): not JSONL, or raise the limit"
    );
    // A small gzip file of NULs that inflates far past the limit.
    let dir = TempDir::new("hostile-long-lines");
    let bomb = dir.path().join("zeros.jsonl.gz");
    write_gzip(&bomb, &vec![0u8; 8 << 20]);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 64 << 10);
    let bomb = path_str(&bomb);
    let out = maskaudit(&["lint", &bomb, "--max-line-bytes", "65536"]);
    assert!(
        error_line(&out).ends_with("zeros.jsonl.gz:1: line longer than 65536 bytes (--max-line-bytes): not JSONL, or raise the limit"),
        "{out:?}"
    );
    // check, on standard input, after a good line.
    let input = format!("{{\"input_ids\":[1,2]}}\n{}\n", " ".repeat(5000)).into_bytes();
    let out = maskaudit_stdin(
        &[
            "check",
            "--device",
            "cpu",
            &fixture("tiny_lm.pt"),
            "-",
            "--max-line-bytes",
            "4096",
        ],
        input.clone(),
    );
    assert!(
        error_line(&out).contains("-:2: line longer than 4096 bytes"),
        "{out:?}"
    );
    // Under the limit the same input reads (a blank line of spaces).
    let out = maskaudit_stdin(&["lint", "-", "--max-line-bytes", "5000"], input);
    assert_eq!(out.code, 0, "{out:?}");
}

#[test]
fn a_named_pipe_is_refused_and_anonymous_pipes_read() {
    let dir = TempDir::new("hostile-fifo");
    let fifo = path_str(&dir.path().join("rows.fifo"));
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    // Opening it would wait for a writer that never comes.
    let out = maskaudit_watched(&["lint", &fifo], Duration::from_secs(30));
    let line = error_line(&out);
    assert!(line.contains("rows.fifo: is a named pipe (FIFO)"), "{line}");
    assert!(line.contains("standard input"), "{line}");

    // Process substitution: /dev/fd/N is a link to pipe:[…].
    let script = format!(
        "exec '{}' lint <(cat fixtures/ragged.jsonl)",
        env!("CARGO_BIN_EXE_maskaudit")
    );
    let out = Command::new("bash")
        .args(["-c", &script])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("verdict: pass"));
    // /dev/stdin on a pipe: two links to pipe:[…].
    let rows = std::fs::read(fixture("ragged.jsonl")).unwrap();
    let out = maskaudit_stdin(&["lint", "/dev/stdin"], rows);
    assert_eq!(out.code, 0, "{out:?}");

    let out = maskaudit(&["lint", "fixtures"]);
    assert_eq!(
        error_line(&out),
        "maskaudit: error: fixtures: is a directory: DATA is a JSONL, .jsonl.gz or Parquet file"
    );
}

#[test]
fn values_from_the_data_are_cut_and_escaped() {
    let dir = TempDir::new("hostile-messages");
    // A megabyte string where ids were expected.
    let long = dir.write(
        "long.jsonl",
        &format!("{{\"input_ids\":\"{}\"}}\n", "x".repeat(1 << 20)),
    );
    let line = error_line(&maskaudit(&["lint", &long])).to_string();
    assert!(line.contains("long.jsonl:1: input_ids: expected an array of integers"));
    assert!(line.contains("characters cut]"), "{line}");
    assert!(line.len() < 600, "{} characters", line.len());

    // Parquet strings reach the message: escape bytes are shown, not sent to the terminal.
    let strings = dir.path().join("strings.parquet");
    write_string_parquet(&strings, "input_ids", &["\u{1b}[2J\u{1b}[31mred\r"]);
    let line = error_line(&maskaudit(&["lint", &path_str(&strings)])).to_string();
    assert!(
        line.contains("row 1: input_ids: expected a list of integers"),
        "{line}"
    );
    assert!(line.contains("\\x1b[2J\\x1b[31mred\\r"), "{line}");
    assert!(!line.contains('\u{1b}') && !line.contains('\r'), "{line:?}");
    // A column name is data too.
    let named = dir.path().join("named.parquet");
    write_string_parquet(&named, "\u{1b}]0;title\u{7}", &["a"]);
    let line = error_line(&maskaudit(&["lint", &path_str(&named)])).to_string();
    assert!(line.contains("columns: \\x1b]0;title\\x07"), "{line:?}");

    // The error printer cuts and escapes whatever reaches it: here the path, typed by the user.
    let path = format!("{}/\u{1b}[31mrows.jsonl", "d".repeat(3000));
    let line = error_line(&maskaudit(&["lint", &path])).to_string();
    assert!(line.contains("characters cut]"), "{line}");
    assert!(line.chars().count() < 1100, "{}", line.chars().count());
    assert!(
        line.contains("\\x1b[31mrows.jsonl") && !line.contains('\u{1b}'),
        "{line}"
    );
}

/// A Parquet file with one string column.
fn write_string_parquet(path: &Path, column: &str, values: &[&str]) {
    use parquet::basic::{LogicalType, Repetition, Type as Physical};
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    use std::sync::Arc;

    let field = Type::primitive_type_builder(column, Physical::BYTE_ARRAY)
        .with_repetition(Repetition::REQUIRED)
        .with_logical_type(Some(LogicalType::String))
        .build()
        .unwrap();
    let schema = Type::group_type_builder("schema")
        .with_fields(vec![Arc::new(field)])
        .build()
        .unwrap();
    let file = std::fs::File::create(path).unwrap();
    let props = Arc::new(WriterProperties::builder().build());
    let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
    let mut group = writer.next_row_group().unwrap();
    let mut col = group.next_column().unwrap().unwrap();
    let values: Vec<ByteArray> = values.iter().map(|v| ByteArray::from(*v)).collect();
    col.typed::<ByteArrayType>()
        .write_batch(&values, None, None)
        .unwrap();
    col.close().unwrap();
    group.close().unwrap();
    writer.close().unwrap();
}

#[test]
fn negative_numbers_are_refused_with_the_valid_range() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    let cases = [
        (
            "--batch-size",
            "-1",
            "'-1' is not a batch size: expected a number of rows from 1",
        ),
        (
            "--pad-id",
            "-1",
            "'-1' is not a token id: expected an integer ≥ 0",
        ),
        (
            "--eos-id",
            "-2",
            "'-2' is not a token id: expected an integer ≥ 0",
        ),
        (
            "--max-contamination",
            "-0.1",
            "'-0.1' is not a non-negative number",
        ),
        ("--max-line-bytes", "-5", "'-5' is not a size in bytes"),
        (
            "--rtol",
            "-1",
            "'-1' is not a relative tolerance in [0, 0.5)",
        ),
        (
            "--rtol",
            "0.5",
            "'0.5' is not a relative tolerance in [0, 0.5)",
        ),
        (
            "--rtol",
            "1e300",
            "'1e300' is not a relative tolerance in [0, 0.5)",
        ),
    ];
    for (option, value, expect) in cases {
        let mut args = vec!["check", "--device", "cpu", &model, &data, option, value];
        if option == "--rtol" {
            args.extend_from_slice(&["--loss", "fixtures/losses/correct_labels.pt"]);
        }
        let out = maskaudit(&args);
        let line = error_line(&out);
        assert!(line.contains(expect), "{option} {value}: {line}");
        assert!(line.contains(&format!("for '{option} ")), "{line}");
        assert!(!line.contains("unexpected argument"), "{line}");
    }
    for option in ["--batch-size", "--pad-id", "--eos-id", "--show"] {
        let line = error_line(&maskaudit(&["lint", &data, option, "-3"])).to_string();
        assert!(line.contains("'-3' is not a"), "{option}: {line}");
    }
}

#[test]
fn options_that_would_be_ignored_are_errors() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    for extra in [
        &["--loss-args", "logits,labels"][..],
        &["--rtol", "0.01"],
        &["--no-probes"],
    ] {
        let mut args = vec!["check", "--device", "cpu", &model, &data];
        args.extend_from_slice(extra);
        let line = error_line(&maskaudit(&args)).to_string();
        assert!(
            line.contains(
                "required arguments were not provided: <--loss <FILE>|--loss-method <NAME>>"
            ),
            "{extra:?}: {line}"
        );
    }
    let line = error_line(&maskaudit(&["lint", &data, "--labels-field", "input_ids"])).to_string();
    assert_eq!(
        line,
        "maskaudit: error: --input-field and --labels-field both name the column 'input_ids': each field needs a column of its own"
    );
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &model,
        &data,
        "--mask-field",
        "m",
        "--position-ids-field",
        "m",
    ]);
    assert!(
        error_line(&out).contains("--mask-field and --position-ids-field both name the column 'm'")
    );
    let out = maskaudit(&["lint", &data, "--attention-mask-field", "cu_seqlens"]);
    assert!(
        error_line(&out).contains("--attention-mask-field cu_seqlens: 'cu_seqlens' is always read")
    );
}

#[test]
fn ids_beyond_the_vocabulary_are_input_errors() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    let out = check_cpu(&model, &data, &["--pad-id", "0", "--eos-id", "48"]);
    assert_eq!(
        error_line(&out),
        "maskaudit: error: --eos-id 48 is outside the model's vocabulary (size 48)"
    );
    let dir = TempDir::new("hostile-vocab");
    let labels = dir.write(
        "labels.jsonl",
        "{\"input_ids\":[1,2,3],\"labels\":[-100,2,3]}\n{\"input_ids\":[1,2,3],\"labels\":[-100,2,48]}\n",
    );
    let out = check_cpu(&model, &labels, &[]);
    assert!(
        error_line(&out).ends_with("labels.jsonl:2: labels: token id 48 at index 2 is outside the model's vocabulary (size 48)"),
        "{out:?}"
    );
    // The last id of the vocabulary is fine.
    let ok = dir.write(
        "ok.jsonl",
        "{\"input_ids\":[1,2,3],\"labels\":[-100,2,47]}\n",
    );
    let out = check_cpu(&model, &ok, &["--eos-id", "47"]);
    assert_ne!(out.code, 2, "{out:?}");
}

#[test]
fn no_trained_target_fails_lint_as_it_fails_check() {
    let dir = TempDir::new("hostile-untrained");
    let data = dir.write(
        "untrained.jsonl",
        "{\"input_ids\":[1,2,3],\"labels\":[-100,-100,-100]}\n{\"input_ids\":[4,5],\"labels\":[4,-100]}\n",
    );
    let out = maskaudit(&["lint", "--format", "json", &data]);
    assert_eq!(out.code, 1, "{out:?}");
    let codes = finding_codes(&out.stdout);
    assert!(
        codes.contains(&("no-trained-positions".into(), "error".into())),
        "{codes:?}"
    );

    let out = check_cpu(&fixture("tiny_lm.pt"), &data, &["--pad-id", "0"]);
    assert_eq!(out.code, 1, "{out:?}");
    let codes = finding_codes(&out.stdout);
    let count = codes
        .iter()
        .filter(|(c, _)| c == "no-trained-positions")
        .count();
    assert_eq!(count, 1, "reported once: {codes:?}");
}

#[test]
fn a_closed_pipe_keeps_the_verdict() {
    let failing = "fixtures/lint/padding_trained.jsonl";
    let args = ["lint", failing, "--pad-id", "0"];
    assert_eq!(maskaudit(&args).code, 1, "the file fails lint");
    let out = maskaudit_into_closed_pipe(&args);
    assert_eq!((out.code, out.stderr.as_str()), (1, ""), "{out:?}");

    let passing = "fixtures/lint/clean_sft.jsonl";
    let out = maskaudit_into_closed_pipe(&["lint", passing, "--format", "json"]);
    assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{out:?}");

    let out = maskaudit_into_closed_pipe(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
        "--max-contamination",
        "0.001",
    ]);
    assert_eq!((out.code, out.stderr.as_str()), (1, ""), "{out:?}");
}

// ---- models and losses (the odd models of `fixtures/generate.py odd`) ----

const SFT_DATA: &str = "fixtures/padded_labels.jsonl";

fn odd(name: &str) -> String {
    fixture(&format!("odd/{name}.pt"))
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"))
}

fn check(model: &str, extra: &[&str]) -> Output {
    let mut args = vec![
        "check",
        "--device",
        "cpu",
        model,
        SFT_DATA,
        "--batch-size",
        "4",
    ];
    args.extend_from_slice(extra);
    maskaudit(&args)
}

fn masked_token_mean(out: &Output) -> f64 {
    json_of(out)["losses"]["masked_token_mean"]
        .as_f64()
        .unwrap_or_else(|| panic!("{out:?}"))
}

#[test]
fn a_model_that_writes_into_its_inputs_cannot_change_the_targets() {
    let honest = check(&fixture("tiny_lm.pt"), &["--format", "json"]);
    let writer = check(&odd("writes_inputs"), &["--format", "json"]);
    assert_eq!((honest.code, writer.code), (0, 0), "{writer:?}");
    assert_close(
        masked_token_mean(&writer),
        masked_token_mean(&honest),
        "in-place writer",
    );
}

#[test]
fn a_model_that_prints_cannot_corrupt_the_json() {
    let out = check(&odd("prints"), &["--format", "json"]);
    assert_eq!(out.code, 0, "{out:?}");
    json_of(&out);
    assert!(
        out.stderr.contains("hello from the model's forward"),
        "the model's print goes to stderr: {out:?}"
    );
}

#[test]
fn overflowing_logits_are_an_error_finding_not_a_pass() {
    let out = check(&odd("huge_logits"), &["--format", "json"]);
    assert_eq!(out.code, 1, "{out:?}");
    let json = json_of(&out);
    let finding = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "non-finite-loss")
        .unwrap_or_else(|| panic!("no non-finite-loss finding: {json}"));
    assert_eq!(finding["severity"], "error");
    let message = finding["message"].as_str().unwrap();
    // Where the first one is: "the first at line N, position T".
    let at = message
        .split("the first at line ")
        .nth(1)
        .unwrap_or_else(|| panic!("{message}"));
    let (line, rest) = at.split_once(", position ").unwrap();
    assert!(line.parse::<usize>().is_ok(), "{message}");
    assert!(
        rest.split(' ').next().unwrap().parse::<usize>().is_ok(),
        "{message}"
    );
    assert_eq!(json["verdict"], "fail");
}

#[test]
fn an_impossible_allocation_fails_cleanly() {
    let out = check(&odd("huge_allocation"), &[]);
    assert_usage_error(
        &out,
        "huge_allocation.pt: the forward failed on a two-token probe input",
    );
    assert!(out.stderr.contains("can't allocate memory"), "{out:?}");
}

#[test]
fn a_loss_that_zeroes_the_logits_cannot_change_the_formulas() {
    let honest = check(&fixture("tiny_lm.pt"), &["--format", "json"]);
    let out = check(
        &fixture("tiny_lm.pt"),
        &["--format", "json", "--loss", &odd("zeroes_logits_loss")],
    );
    assert_eq!(out.code, 0, "{out:?}");
    let json = json_of(&out);
    assert_eq!(json["user_loss"]["matched"], "masked_token_mean", "{json}");
    assert_close(
        masked_token_mean(&out),
        masked_token_mean(&honest),
        "after a zeroing loss",
    );
}

#[test]
fn a_nan_or_complex_loss_is_an_input_error() {
    for name in ["nan_loss", "complex_loss"] {
        let out = check(&fixture("tiny_lm.pt"), &["--loss", &odd(name)]);
        assert_usage_error(&out, "not a finite real number");
        assert!(out.stderr.contains(name), "{out:?}");
    }
}

// ---- data safety: outputs never touch inputs (issue 20) ----

/// The inputs of a `check` run, copied where links to them can be made: (what, path).
fn safety_inputs(dir: &TempDir) -> Vec<(&'static str, String)> {
    let copy = |from: &str, to: &str| {
        let path = dir.path().join(to);
        std::fs::copy(from, &path).unwrap();
        path.display().to_string()
    };
    vec![
        ("data", copy("fixtures/ragged.jsonl", "data.jsonl")),
        ("model", copy("fixtures/tiny_lm.pt", "model.pt")),
        (
            "loss",
            copy("fixtures/losses/reduce_then_mask.pt", "loss.pt"),
        ),
        (
            "tokenizer",
            copy("fixtures/lint/tokenizer.json", "tokenizer.json"),
        ),
        (
            "baseline",
            dir.write(
                "baseline.json",
                "{\"baseline_version\": 1, \"findings\": []}",
            ),
        ),
    ]
}

fn contents(inputs: &[(&'static str, String)]) -> Vec<Vec<u8>> {
    inputs
        .iter()
        .map(|(_, p)| std::fs::read(p).unwrap())
        .collect()
}

/// `check` over the inputs with every input option given once; `output` (an option and its
/// file) is added, and a scratch `--html` when the output is another (the tokenizer needs it).
fn safety_args(
    inputs: &[(&'static str, String)],
    data: &str,
    output: Option<(&str, &str)>,
    scratch: &str,
) -> Vec<String> {
    let path = |what: &str| inputs.iter().find(|(w, _)| *w == what).unwrap().1.clone();
    let mut args: Vec<String> = [
        "check",
        "--device",
        "cpu",
        "--quiet",
        "--format",
        "json",
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--loss-args",
        "shift_logits,targets,loss_mask",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([path("model"), data.to_string()]);
    for (option, what) in [
        ("--loss", "loss"),
        ("--tokenizer", "tokenizer"),
        ("--baseline", "baseline"),
    ] {
        args.extend([option.to_string(), path(what)]);
    }
    if let Some((option, file)) = output {
        args.extend([option.to_string(), file.to_string()]);
    }
    if output.is_none_or(|(option, _)| option != "--html") {
        args.extend(["--html".to_string(), scratch.to_string()]);
    }
    args
}

/// Runs maskaudit with standard input read from `stdin` and extra environment variables.
fn maskaudit_stdin_from(args: &[String], stdin: &str, env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("RUST_BACKTRACE")
        .env_remove("GITHUB_STEP_SUMMARY")
        .envs(env.iter().copied())
        .stdin(std::fs::File::open(stdin).unwrap())
        .output()
        .expect("run maskaudit");
    Output {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

const OUTPUT_OPTIONS: [&str; 4] = ["--weights-out", "--junit", "--html", "--write-baseline"];

/// The report itself, appended onto an input (`maskaudit … >> INPUT`): exit 2 before the run,
/// and every input byte for byte as it was; appended to another file, the run goes on.
#[test]
fn standard_output_cannot_append_to_an_input() {
    let dir = TempDir::new("safety-stdout");
    let inputs = safety_inputs(&dir);
    let before = contents(&inputs);
    let scratch = dir.path().join("scratch.html").display().to_string();
    let data = inputs[0].1.clone();
    let args = safety_args(&inputs, &data, None, &scratch);
    for (what, input) in inputs.iter().take(4) {
        let out = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env_remove("GITHUB_STEP_SUMMARY")
            .stdout(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(input)
                    .unwrap(),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(2), "{what}: {stderr}");
        assert!(
            stderr.contains("standard output is the"),
            "{what}: {stderr}"
        );
        assert_eq!(contents(&inputs), before, "{what} was written to");
    }
    let report = dir.path().join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_maskaudit"))
        .args(&args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env_remove("GITHUB_STEP_SUMMARY")
        .stdout(std::fs::File::create(&report).unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(std::fs::metadata(&report).unwrap().len() > 0);
}

/// Every output (the four options and GITHUB_STEP_SUMMARY) aimed at every input, by its path,
/// a symbolic link and a hard link: exit 2 naming the output, and every input byte for byte
/// as it was. Long because it is one table: outputs × inputs × ways to name a file.
#[test]
fn no_output_can_overwrite_an_input() {
    let dir = TempDir::new("safety-matrix");
    let inputs = safety_inputs(&dir);
    let before = contents(&inputs);
    let scratch = dir.path().join("scratch.html").display().to_string();
    let mut cases = 0;
    for (what, input) in &inputs {
        let link = dir.path().join(format!("link-{what}"));
        std::os::unix::fs::symlink(input, &link).unwrap();
        let hard = dir.path().join(format!("hard-{what}"));
        std::fs::hard_link(input, &hard).unwrap();
        for target in [input.clone(), path_str(&link), path_str(&hard)] {
            for option in OUTPUT_OPTIONS {
                if option == "--write-baseline" && *what == "baseline" {
                    continue; // It may update the baseline it reads (below).
                }
                let data = &inputs[0].1;
                let args = safety_args(&inputs, data, Some((option, &target)), &scratch);
                let out = maskaudit_stdin_from(&args, "/dev/null", &[]);
                let line = error_line(&out);
                assert!(
                    line.contains(&format!("{option} {target}: is the "))
                        && line.contains("refusing to overwrite"),
                    "{option} {target}: {out:?}"
                );
                assert_eq!(
                    contents(&inputs),
                    before,
                    "{option} onto the {what} as {target}"
                );
                cases += 1;
            }
            let args = safety_args(&inputs, &inputs[0].1, None, &scratch);
            let out = maskaudit_stdin_from(&args, "/dev/null", &[("GITHUB_STEP_SUMMARY", &target)]);
            assert!(
                error_line(&out).contains(&format!("GITHUB_STEP_SUMMARY {target}: is the ")),
                "{out:?}"
            );
            assert_eq!(
                contents(&inputs),
                before,
                "GITHUB_STEP_SUMMARY onto the {what} as {target}"
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 5 * 3 * 5 - 3);
    assert!(
        !Path::new(&scratch).exists(),
        "a refused run writes nothing"
    );
}

/// DATA `-` with standard input from the data file: `/dev/stdin` and `/proc/self/fd/0` are
/// that file, for every output.
#[test]
fn no_output_can_overwrite_the_file_on_standard_input() {
    let dir = TempDir::new("safety-stdin");
    let inputs = safety_inputs(&dir);
    let before = contents(&inputs);
    let scratch = dir.path().join("scratch.html").display().to_string();
    let data = &inputs[0].1;
    for target in ["/dev/stdin", "/proc/self/fd/0"] {
        for option in OUTPUT_OPTIONS {
            let args = safety_args(&inputs, "-", Some((option, target)), &scratch);
            let out = maskaudit_stdin_from(&args, data, &[]);
            assert!(
                error_line(&out).contains(&format!(
                    "{option} {target}: is the DATA of this run (standard input)"
                )),
                "{out:?}"
            );
            assert_eq!(contents(&inputs), before, "{option} {target}");
        }
        let args = safety_args(&inputs, "-", None, &scratch);
        let out = maskaudit_stdin_from(&args, data, &[("GITHUB_STEP_SUMMARY", target)]);
        assert!(error_line(&out).contains("GITHUB_STEP_SUMMARY"), "{out:?}");
        assert_eq!(contents(&inputs), before, "GITHUB_STEP_SUMMARY {target}");
    }
    // The same run with its outputs elsewhere reads the data from standard input.
    let args = safety_args(&inputs, "-", None, &scratch);
    let out = maskaudit_stdin_from(&args, data, &[]);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(contents(&inputs), before);
}

#[test]
fn two_outputs_on_one_file_are_a_usage_error() {
    let dir = TempDir::new("safety-twice");
    let report = dir.path().join("report").display().to_string();
    let out = maskaudit(&[
        "lint",
        "fixtures/ragged.jsonl",
        "--junit",
        &report,
        "--html",
        &report,
    ]);
    assert_eq!(
        error_line(&out),
        format!("maskaudit: error: --junit {report} and --html {report} are one file: give each output a file of its own")
    );
    assert!(!Path::new(&report).exists());
    // An existing file under two names (a hard link): the same refusal, the file untouched.
    std::fs::write(&report, "old").unwrap();
    let other = dir.path().join("other");
    std::fs::hard_link(&report, &other).unwrap();
    let out = maskaudit(&[
        "lint",
        "fixtures/ragged.jsonl",
        "--junit",
        &report,
        "--write-baseline",
        &path_str(&other),
    ]);
    assert!(error_line(&out).contains("are one file"), "{out:?}");
    assert_eq!(std::fs::read_to_string(&report).unwrap(), "old");
}

/// A `check` run with every output, over data whose third batch holds an id beyond the
/// vocabulary: two batches run (the weights of their rows are streamed), then exit 2.
fn failing_midway(dir: &TempDir, outputs: &[String; 5]) -> Output {
    let mut rows = std::fs::read_to_string("fixtures/ragged.jsonl").unwrap();
    rows.push_str("{\"input_ids\":[1,100000,2]}\n");
    let data = dir.write("bad.jsonl", &rows);
    let [weights, junit, html, baseline, summary] = outputs;
    let args: Vec<String> = [
        "check",
        "--device",
        "cpu",
        "--quiet",
        "fixtures/tiny_lm.pt",
        &data,
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--loss",
        "fixtures/losses/reduce_then_mask.pt",
        "--loss-args",
        "shift_logits,targets,loss_mask",
        "--weights-out",
        weights,
        "--junit",
        junit,
        "--html",
        html,
        "--write-baseline",
        baseline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    maskaudit_stdin_from(&args, "/dev/null", &[("GITHUB_STEP_SUMMARY", summary)])
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn a_failed_run_writes_no_report_and_keeps_the_old_ones() {
    let dir = TempDir::new("safety-failed");
    let outputs = ["w.jsonl", "j.xml", "h.html", "b.json", "summary.md"]
        .map(|n| dir.path().join(n).display().to_string());
    let out = failing_midway(&dir, &outputs);
    assert!(
        error_line(&out).contains("outside the model's vocabulary"),
        "{out:?}"
    );
    assert_eq!(
        names(dir.path()),
        ["bad.jsonl"],
        "no report, no temporary file"
    );

    for (i, path) in outputs.iter().enumerate() {
        std::fs::write(path, format!("old {i}\n")).unwrap();
    }
    let out = failing_midway(&dir, &outputs);
    assert_eq!(out.code, 2, "{out:?}");
    for (i, path) in outputs.iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(path).unwrap(),
            format!("old {i}\n"),
            "{path}"
        );
    }
    assert_eq!(names(dir.path()).len(), 6, "{:?}", names(dir.path()));
}

/// A failed check (exit 1) is what CI reports are for: every one is written, through a link
/// onto its target, the summary after what it held.
#[test]
fn a_failed_check_writes_every_report() {
    let dir = TempDir::new("safety-exit1");
    let outputs = ["w.jsonl", "j.xml", "h.html", "b.json", "summary.md"]
        .map(|n| dir.path().join(n).display().to_string());
    std::fs::write(&outputs[4], "## an earlier step\n").unwrap();
    let target = dir.path().join("target.xml");
    std::fs::write(&target, "old").unwrap();
    let link = dir.path().join("link.xml");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let args: Vec<String> = [
        "check",
        "--device",
        "cpu",
        "--quiet",
        "fixtures/tiny_lm.pt",
        "fixtures/ragged.jsonl",
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--loss",
        "fixtures/losses/reduce_then_mask.pt",
        "--loss-args",
        "shift_logits,targets,loss_mask",
        "--weights-out",
        &outputs[0],
        "--junit",
        &path_str(&link),
        "--html",
        &outputs[2],
        "--write-baseline",
        &outputs[3],
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = maskaudit_stdin_from(&args, "/dev/null", &[("GITHUB_STEP_SUMMARY", &outputs[4])]);
    assert_eq!(out.code, 1, "{out:?}");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(
        read(Path::new(&outputs[0])).lines().count(),
        30,
        "a line a row"
    );
    assert!(read(&target).starts_with("<?xml"), "{}", read(&target));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(read(Path::new(&outputs[2])).contains("<html"));
    assert!(read(Path::new(&outputs[3])).contains("baseline_version"));
    assert!(
        read(Path::new(&outputs[4])).starts_with("## an earlier step\n## maskaudit check: FAIL")
    );
    // Writing to a device is writing, not replacing it.
    let out = maskaudit(&[
        "lint",
        "fixtures/ragged.jsonl",
        "--junit",
        "/dev/null",
        "--html",
        "/dev/null",
    ]);
    assert!(out.code == 0 || out.code == 1, "{out:?}");
}

// ---- option values bounded before anything is allocated (issue 20) ----

#[test]
fn huge_batch_and_step_sizes_are_refused_not_allocated() {
    let model = fixture("tiny_lm.pt");
    let data = fixture("ragged.jsonl");
    for (args, expect) in [
        (&["--batch-size", "4294967295"][..], "--batch-size"),
        (&["--batch-size", "1048577"], "--batch-size"),
        (&["--accum", "4294967295"], "--accum"),
        (&["--world-size", "4294967295"], "--world-size"),
        (
            &["--accum", "1024", "--world-size", "1025"],
            "--accum 1024 × --world-size 1025",
        ),
    ] {
        let out = check_cpu(&model, &data, args);
        assert!(error_line(&out).contains(expect), "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("1048576"),
            "the bound is stated: {out:?}"
        );
    }
    let out = maskaudit(&["lint", &data, "--batch-size", "4294967295"]);
    assert!(error_line(&out).contains("to 1048576"), "{out:?}");
    // At the bounds: memory comes from the 30 rows, and the run is a normal one.
    for args in [
        &["--batch-size", "1048576"][..],
        &["--accum", "1048576"],
        &["--world-size", "1048576"],
        &[
            "--accum",
            "1024",
            "--world-size",
            "1024",
            "--batch-size",
            "1048576",
        ],
    ] {
        let mut args = args.to_vec();
        args.extend(["--pad-id", "0"]);
        let out = check_cpu(&model, &data, &args);
        assert!(out.code == 0 || out.code == 1, "{args:?}: {out:?}");
        assert!(!out.stderr.contains("panicked"), "{out:?}");
    }
    let out = maskaudit(&["lint", &data, "--batch-size", "1048576"]);
    assert!(out.code == 0 || out.code == 1, "{out:?}");
}
