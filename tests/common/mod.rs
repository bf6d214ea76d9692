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
        .env_remove("RUST_BACKTRACE");
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
