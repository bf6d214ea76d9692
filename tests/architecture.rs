//! The source tree's shape (ARCHITECTURE.md). Its layering: each top-level module of `src/` may name only
//! the modules below it, so that there is no import circle and a layer can be read without the
//! ones above it.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

/// Bottom to top. A module may use its own layer's other modules only where listed here.
const LAYERS: &[&[&str]] = &[
    &["findings", "sys"],
    &["data"],
    &["model", "lint"],
    &["loss"],
    &["report"],
    &["commands"],
    &["cli"],
];

fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

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
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut seen = 0;
    let mut wrong = vec![];
    for entry in fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        if stem == "main" || stem == "lib" {
            continue;
        }
        let own = layer(&stem).unwrap_or_else(|| {
            panic!("src/{stem} is in no layer: add it to LAYERS in tests/architecture.rs")
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
                Some(l) if l >= own => wrong.push(format!("{stem} uses crate::{name}")),
                _ => {}
            }
        }
    }
    assert_eq!(seen, LAYERS.iter().map(|l| l.len()).sum::<usize>());
    assert!(wrong.is_empty(), "upward or sideways uses: {wrong:?}");
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

fn rust_files(path: &Path, out: &mut Vec<std::path::PathBuf>) {
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
    for dir in ["src", "tests", "bench"] {
        rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join(dir), &mut files);
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
