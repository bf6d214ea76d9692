//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A fixture path relative to the crate root, as a user would type it.
pub fn fixture(name: &str) -> String {
    format!("fixtures/{name}")
}

pub fn expected() -> serde_json::Value {
    let text =
        std::fs::read_to_string(root().join("fixtures/expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_maskaudit"));
    cmd.args(args)
        .current_dir(root())
        .env_remove("RUST_BACKTRACE")
        // Colour decisions are tested explicitly (maskaudit_env).
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR")
        .env_remove("CLICOLOR_FORCE");
    cmd
}

fn finish(out: std::process::Output) -> Output {
    Output {
        code: out.status.code().expect("exited, not killed by a signal"),
        stdout: String::from_utf8(out.stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(out.stderr).expect("utf-8 stderr"),
    }
}

pub fn maskaudit(args: &[&str]) -> Output {
    finish(
        command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run maskaudit"),
    )
}

/// Runs with extra environment variables.
pub fn maskaudit_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args);
    cmd.stdin(Stdio::null());
    for (key, value) in env {
        cmd.env(key, value);
    }
    finish(cmd.output().expect("run maskaudit"))
}

pub fn maskaudit_stdin(args: &[&str], input: Vec<u8>) -> Output {
    let mut child = command(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn maskaudit");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().expect("wait");
    writer.join().unwrap();
    finish(out)
}

/// Exit 2 and exactly one line on stderr containing `expect`.
pub fn assert_usage_error(out: &Output, expect: &str) {
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        out.stderr.contains(expect),
        "expected {expect:?} in stderr: {out:?}"
    );
    assert_eq!(
        out.stderr.trim_end().lines().count(),
        1,
        "one line: {out:?}"
    );
    assert!(out.stderr.starts_with("maskaudit: error: "), "{out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

/// Whether two values agree to 1e-5 relative (the fixtures' standard).
pub fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-5 * a.abs().max(b.abs())
}

pub fn assert_close(got: f64, want: f64, what: &str) {
    let rel = (got - want).abs() / want.abs().max(1e-12);
    assert!(
        rel <= 1e-5,
        "{what}: got {got}, want {want} (relative error {rel:e})"
    );
}

/// A scratch directory under the target dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn write(&self, file: &str, contents: &str) -> String {
        let path = self.0.join(file);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rows of a JSONL fixture as JSON values.
pub fn jsonl_rows(path: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(root().join(path))
        .expect("fixture")
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("fixture line"))
        .collect()
}

/// Gzip-compresses bytes into `path`.
pub fn write_gzip(path: &Path, bytes: &[u8]) {
    use flate2::write::GzEncoder;
    let mut encoder = GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(bytes).unwrap();
    std::fs::write(path, encoder.finish().unwrap()).unwrap();
}

/// Writes JSON rows as Parquet the way pyarrow does: every array field an optional
/// `list<int64>` (or `list<int32>`) of optional elements, plus a string column `text` that
/// maskaudit must skip. A missing field is a null list. Row groups hold `group_rows` rows.
/// Long because the parquet crate's writer wants the schema, each column's definition and
/// repetition levels and the row groups spelt out, in that order.
pub fn write_parquet(
    path: &Path,
    rows: &[serde_json::Value],
    int32: bool,
    compression: parquet::basic::Compression,
    group_rows: usize,
) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let mut names: Vec<String> = vec![];
    for row in rows {
        for (key, value) in row.as_object().unwrap() {
            if value.is_array() && !names.contains(key) {
                names.push(key.clone());
            }
        }
    }
    let ty = if int32 { "int32" } else { "int64" };
    let mut message = String::from("message schema {\n  optional binary text (STRING);\n");
    for name in &names {
        message.push_str(&format!(
            "  optional group {name} (LIST) {{ repeated group list {{ optional {ty} element; }} }}\n"
        ));
    }
    message.push('}');
    let schema = Arc::new(parse_message_type(&message).unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(compression)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
    for (g, group) in rows.chunks(group_rows).enumerate() {
        let mut row_group = writer.next_row_group().unwrap();
        let mut column = 0;
        while let Some(mut col) = row_group.next_column().unwrap() {
            if column == 0 {
                let text: Vec<ByteArray> = (0..group.len())
                    .map(|i| ByteArray::from(format!("row {}", g * group_rows + i + 1).as_str()))
                    .collect();
                let def = vec![1i16; group.len()];
                col.typed::<ByteArrayType>()
                    .write_batch(&text, Some(&def), None)
                    .unwrap();
            } else {
                let name = &names[column - 1];
                let (mut values, mut def, mut rep) = (vec![], vec![], vec![]);
                for row in group {
                    match row.get(name).and_then(|v| v.as_array()) {
                        None => {
                            def.push(0);
                            rep.push(0);
                        }
                        Some(list) if list.is_empty() => {
                            def.push(1);
                            rep.push(0);
                        }
                        Some(list) => {
                            for (i, v) in list.iter().enumerate() {
                                rep.push(if i == 0 { 0 } else { 1 });
                                match v.as_i64() {
                                    Some(x) => {
                                        values.push(x);
                                        def.push(3);
                                    }
                                    None => def.push(2),
                                }
                            }
                        }
                    }
                }
                if int32 {
                    let values: Vec<i32> = values.iter().map(|&v| v as i32).collect();
                    col.typed::<Int32Type>()
                        .write_batch(&values, Some(&def), Some(&rep))
                        .unwrap();
                } else {
                    col.typed::<Int64Type>()
                        .write_batch(&values, Some(&def), Some(&rep))
                        .unwrap();
                }
            }
            col.close().unwrap();
            column += 1;
        }
        row_group.close().unwrap();
    }
    writer.close().unwrap();
}

/// `target/hf-models/<sub>`, written by `make hf-models` (tests/export/), checked to hold
/// `file` so that a missing set-up says how to make it.
pub fn hf_models(sub: &str, file: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/hf-models")
        .join(sub);
    assert!(
        dir.join(file).is_file(),
        "{} is missing: run `make hf-models` (make test does)",
        dir.join(file).display()
    );
    dir
}

/// The `--loss-args` of a policy loss over rollouts (tests/rl_*.rs).
pub const POLICY: &str = "logprobs,old_logprobs,advantages,response_mask";

/// [`POLICY`] for a case of a generator's expected.json, with `num_items_in_batch` where the
/// case takes the count (`takes_count`).
pub fn policy_loss_args(want: &serde_json::Value) -> String {
    if want["takes_count"].as_bool().unwrap() {
        format!("{POLICY},num_items_in_batch")
    } else {
        POLICY.to_string()
    }
}

/// `check --format json` of fixtures/tiny_lm.pt on policy rollouts or preference pairs with a
/// `--loss` file, four rows (pairs) a batch, on the CPU (tests/rl_losses.rs, tests/rl_trl.rs).
pub fn check_rl(data: &str, loss: &str, args: &str, extra: &[&str]) -> (serde_json::Value, Output) {
    let model = fixture("tiny_lm.pt");
    let mut argv = vec![
        "check",
        "--format",
        "json",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        &model,
        data,
        "--loss",
        loss,
        "--loss-args",
        args,
    ];
    argv.extend_from_slice(extra);
    let out = maskaudit(&argv);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (json, out)
}
