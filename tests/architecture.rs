//! The source tree's shape (ARCHITECTURE.md). The crates' boundaries are the compiler's to
//! hold (maskaudit-core cannot name libtorch or the model side, maskaudit-torch cannot name
//! the commands, the commands cannot name the command line); inside a crate, each top-level
//! module may name only the modules below it, so that there is no import circle and a layer
//! can be read without the ones above it. Also: no long function without a reason, the
//! environment read in one place, and one minimum Rust for every crate.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Each crate's source folder and its layers, bottom to top. A module may use its own layer's
/// other modules only where listed here. `crate::NAME` for a NAME in no layer of the crate
/// is another crate's module, under a local name (src/lib.rs): below everything.
const CRATES: &[(&str, &[&[&str]])] = &[
    (
        "crates/maskaudit-core/src",
        &[
            &["escape", "findings", "sys"],
            &["data"],
            &["model", "lint"],
            &["loss"],
            &["report"],
        ],
    ),
    ("crates/maskaudit-torch/src", &[&["model"], &["loss"]]),
    ("src", &[&["commands"], &["cli"]]),
];

/// Every `crate::NAME` in the Rust files under `path` (a file or a folder), comments included:
/// a doc link upwards is as much a tangle as an import.
fn crate_paths(path: &Path, out: &mut BTreeSet<String>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            crate_paths(&entry.unwrap().path(), out);
        }
        return;
    }
    if path.extension().and_then(|e| e.to_str()) != Some("rs") {
        return;
    }
    let text = fs::read_to_string(path).unwrap();
    for (i, _) in text.match_indices("crate::") {
        let name: String = text[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.insert(name);
        }
    }
}

#[test]
fn each_module_uses_only_the_layers_below_it() {
    let mut wrong = vec![];
    for &(dir, layers) in CRATES {
        let layer = |module: &str| layers.iter().position(|l| l.contains(&module));
        let mut seen = 0;
        for entry in fs::read_dir(root().join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            if stem == "main" || stem == "lib" {
                continue;
            }
            let own = layer(&stem).unwrap_or_else(|| {
                panic!("{dir}/{stem} is in no layer: add it to CRATES in tests/architecture.rs")
            });
            seen += 1;
            let mut used = BTreeSet::new();
            crate_paths(&path, &mut used);
            for name in used {
                if name == stem {
                    continue;
                }
                // Functions of the crate root (by_name, one_line) are below everything.
                match layer(&name) {
                    Some(l) if l >= own => wrong.push(format!("{dir}/{stem} uses crate::{name}")),
                    _ => {}
                }
            }
        }
        assert_eq!(seen, layers.iter().map(|l| l.len()).sum::<usize>(), "{dir}");
    }
    assert!(wrong.is_empty(), "upward or sideways uses: {wrong:?}");
}

/// The manifests of the workspace: the root's and each crate's.
fn manifests() -> Vec<PathBuf> {
    let mut out = vec![root().join("Cargo.toml")];
    for entry in fs::read_dir(root().join("crates")).unwrap() {
        out.push(entry.unwrap().path().join("Cargo.toml"));
    }
    out
}

/// One minimum Rust (ARCHITECTURE.md, "Minimum Rust"): the workspace declares it, every crate
/// takes it from there, so clippy's `incompatible_msrv` holds all of the code to it.
#[test]
fn every_crate_inherits_the_workspace_rust_version() {
    let root_manifest = fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let declared = root_manifest
        .split("[workspace.package]")
        .nth(1)
        .and_then(|t| t.split("\n[").next())
        .is_some_and(|t| t.lines().any(|l| l.starts_with("rust-version = \"")));
    assert!(declared, "[workspace.package] has no rust-version");
    let manifests = manifests();
    assert!(manifests.len() >= 3, "{manifests:?}");
    for manifest in manifests {
        let text = fs::read_to_string(&manifest).unwrap();
        let package = text.split("[package]").nth(1).unwrap_or_else(|| {
            panic!("{}: no [package]", manifest.display());
        });
        let package = package.split("\n[").next().unwrap();
        assert!(
            package
                .lines()
                .any(|l| l == "rust-version.workspace = true"),
            "{}: [package] lacks `rust-version.workspace = true`",
            manifest.display()
        );
        assert!(
            text.contains("[lints]\nworkspace = true"),
            "{}: lacks `[lints] workspace = true`",
            manifest.display()
        );
    }
}

/// `1.89` as (1, 89, 0).
fn version(text: &str) -> (u64, u64, u64) {
    let mut parts = text.split('.').map(|p| p.parse::<u64>().unwrap());
    let major = parts.next().unwrap();
    (major, parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The declared minimum is no lower than what any locked dependency declares: cargo refuses a
/// toolchain older than a dependency's `rust-version`, so a lower value would be a promise the
/// build cannot keep.
#[test]
fn the_rust_version_covers_the_locked_dependencies() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = metadata["packages"].as_array().unwrap();
    let ours = packages
        .iter()
        .find(|p| p["name"] == "maskaudit")
        .and_then(|p| p["rust_version"].as_str())
        .map(version)
        .expect("maskaudit declares a rust-version");
    let newest = packages
        .iter()
        .filter(|p| p["source"].is_string())
        .filter_map(|p| Some((version(p["rust_version"].as_str()?), p["name"].as_str()?)))
        .max()
        .unwrap();
    assert!(
        ours >= newest.0,
        "rust-version {ours:?} is below {}'s {:?}",
        newest.1,
        newest.0
    );
}

/// The settings module: the one place the process's environment is read or written.
const SETTINGS: &str = "src/cli/settings.rs";

/// What reads or writes the environment.
const ENV_CALLS: &[&str] = &[
    "env::var(",
    "env::var_os(",
    "env::vars(",
    "env::vars_os(",
    "env::set_var(",
    "env::remove_var(",
];

/// Where each of `needles` occurs in the code (comments and string literals blanked) of the
/// Rust files under the crates' sources, as `path:line`.
fn code_uses(needles: &[&str], except: &str) -> Vec<String> {
    let mut files = vec![];
    for &(dir, _) in CRATES {
        rust_files(&root().join(dir), &mut files);
    }
    assert!(
        files.len() > 50,
        "only {} files: is the scan broken?",
        files.len()
    );
    let mut found = vec![];
    for file in files {
        let rel = file
            .strip_prefix(root())
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == except {
            continue;
        }
        let code = code_only(&fs::read_to_string(&file).unwrap());
        for (n, line) in code.lines().enumerate() {
            if needles.iter().any(|w| line.contains(w)) {
                found.push(format!("{rel}:{}", n + 1));
            }
        }
    }
    found
}

#[test]
fn the_environment_is_read_only_by_the_settings() {
    let found = code_uses(ENV_CALLS, SETTINGS);
    assert!(
        found.is_empty(),
        "environment read or written outside {SETTINGS} (resolve it there and pass it in): {found:?}"
    );
    // The scan sees through `use std::env;` and a full path alike, and not into comments.
    let probe = "use std::env;\nfn f() { let _ = env::var(\"X\"); std::env::set_var(\"Y\", \"1\"); }\n// env::var(\n";
    let code = code_only(probe);
    let hits = code
        .lines()
        .filter(|l| ENV_CALLS.iter().any(|w| l.contains(w)))
        .count();
    assert_eq!(hits, 1);
}

/// Lines a function may span before its doc comment must say why (a line starting
/// `/// Long because`).
const LONGEST_FUNCTION: usize = 80;

/// Blanks out comments, string and character literals, so that braces in them do not count.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            while i < b.len() && b[i] != b'\n' {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if rest.starts_with(b"r#\"") || rest.starts_with(b"r\"") {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            let mut end = b"\"".to_vec();
            end.extend(std::iter::repeat_n(b'#', hashes));
            let start = i;
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&end) {
                i += 1;
            }
            i = (i + end.len()).min(b.len());
            b[start..i].iter().for_each(|&c| blank(&mut out, c));
        } else if b[i] == b'"' {
            blank(&mut out, b[i]);
            i += 1;
            while i < b.len() && b[i] != b'"' {
                let n = if b[i] == b'\\' { 2 } else { 1 };
                b[i..(i + n).min(b.len())]
                    .iter()
                    .for_each(|&c| blank(&mut out, c));
                i += n;
            }
            if i < b.len() {
                blank(&mut out, b[i]);
                i += 1;
            }
        } else if b[i] == b'\'' && (rest.get(2) == Some(&b'\'') || rest.get(1) == Some(&b'\\')) {
            // A character literal ('{', '\n', '\''), not a lifetime.
            let len = if rest[1] == b'\\' {
                rest[2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(2, |p| p + 3)
            } else {
                3
            };
            let end = (i + len).min(b.len());
            b[i..end].iter().for_each(|&c| blank(&mut out, c));
            i = end;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
        out.push(path.to_path_buf());
    }
}

/// `(name, first line, lines)` of every function with a body in `text`.
fn functions(text: &str) -> Vec<(String, usize, usize)> {
    let code = code_only(text);
    let lines: Vec<&str> = code.lines().collect();
    let mut found = vec![];
    for (start, line) in lines.iter().enumerate() {
        let Some(at) = line.find("fn ").filter(|&at| {
            at == 0
                || !line.as_bytes()[at - 1].is_ascii_alphanumeric()
                    && line[..at].trim_end().chars().all(|c| {
                        c.is_ascii_lowercase()
                            || c == ' '
                            || c == '('
                            || c == ')'
                            || c == '"'
                            || c == '_'
                    })
        }) else {
            continue;
        };
        let name: String = line[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            continue;
        }
        let mut depth = 0i64;
        let mut opened = false;
        'scan: for (end, l) in lines.iter().enumerate().skip(start) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break 'scan,
                    _ => {}
                }
                if opened && depth == 0 {
                    found.push((name.clone(), start + 1, end - start + 1));
                    break 'scan;
                }
            }
        }
    }
    found
}

#[test]
fn no_function_is_long_without_a_reason() {
    let mut files = vec![];
    for dir in ["src", "crates", "tests", "bench"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut long = vec![];
    let mut seen = 0;
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (name, line, len) in functions(&text) {
            seen += 1;
            if len <= LONGEST_FUNCTION {
                continue;
            }
            let reason = lines[..line - 1]
                .iter()
                .rev()
                .take_while(|l| {
                    let l = l.trim_start();
                    l.starts_with("///") || l.starts_with("#[")
                })
                .any(|l| l.trim_start().starts_with("/// Long because"));
            if !reason {
                long.push(format!("{}:{line} {name} ({len} lines)", file.display()));
            }
        }
    }
    assert!(
        seen > 500,
        "only {seen} functions found: is the scan broken?"
    );
    assert!(
        long.is_empty(),
        "functions over {LONGEST_FUNCTION} lines with no `/// Long because` in their doc: {long:#?}"
    );
}

#[test]
fn the_function_scan_measures_bodies_not_literals() {
    let text = "fn a() {\n    let s = \"}\";\n    let c = '{';\n    // }\n}\n\nfn b(x: &str) -> &str;\nfn c<'a>(x: &'a str) -> &'a str {\n    x\n}\n";
    assert_eq!(
        functions(text),
        vec![("a".to_string(), 1, 5), ("c".to_string(), 8, 3)]
    );
}
