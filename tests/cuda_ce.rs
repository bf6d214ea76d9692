//! The fused CUDA cross-entropy (`loss::cuda_ce`) against libtorch's kernels on the same GPU,
//! and the fixture's float32 audit on a GPU against PyTorch's numbers in expected.json.
//!
//! Needs a CUDA GPU: without one each test says so on stderr and passes, unless
//! `MASKAUDIT_REQUIRE_CUDA=1` (set it where a GPU is expected), which makes that a failure.
//! Built here and run on a GPU machine, `MASKAUDIT_BIN` and `MASKAUDIT_FIXTURES` name the
//! binary and the fixtures folder there (default: this build's binary, the crate's fixtures).

use std::path::PathBuf;
use std::process::Command;

use maskaudit_torch::loss::{self, cuda_ce};
use maskaudit_torch::model;
use tch::{Device, Kind, Tensor};

fn cuda() -> Option<Device> {
    let required = std::env::var_os("MASKAUDIT_REQUIRE_CUDA").is_some_and(|v| v == "1");
    let why = match model::load_cuda_backend() {
        Err(e) => e,
        Ok(()) if tch::Cuda::device_count() == 0 => "no CUDA device".to_string(),
        Ok(()) => return Some(Device::Cuda(0)),
    };
    assert!(!required, "MASKAUDIT_REQUIRE_CUDA=1 but {why}");
    eprintln!("skipped: {why}");
    None
}

/// Fused and libtorch losses and finiteness for the same logits.
fn both(logits: &Tensor, ids: &Tensor) -> ((Tensor, bool), (Tensor, bool)) {
    let fused = cuda_ce::queue_token_losses(logits, ids)
        .unwrap()
        .unwrap_or_else(|| {
            panic!(
                "the fused kernel should run here: {:?}",
                cuda_ce::available(0)
            )
        });
    let reference =
        loss::queue_libtorch_token_losses(logits, ids, loss::CUDA_CHUNK_ELEMENTS).unwrap();
    let f = bool::try_from(&fused.finite).unwrap();
    let r = bool::try_from(&reference.finite).unwrap();
    (
        (fused.losses.to_device(Device::Cpu), f),
        (reference.losses.to_device(Device::Cpu), r),
    )
}

/// The largest |fused − libtorch| over (1e-6·|libtorch| + 2e-6): at most 1 passes.
fn worst(fused: &Tensor, reference: &Tensor) -> f64 {
    let tolerance = reference.abs() * 1e-6 + 2e-6;
    ((fused - reference).abs() / tolerance)
        .max()
        .double_value(&[])
}

#[test]
fn fused_losses_match_libtorch() {
    let Some(device) = cuda() else { return };
    let _guard = tch::no_grad_guard();
    tch::manual_seed(13);
    let shapes: [(i64, i64, i64); 10] = [
        (1, 2, 1),
        (2, 5, 7),
        (3, 4, 31),
        (2, 6, 33),
        (2, 3, 100),
        (2, 9, 1003),
        (3, 7, 4096),
        (4, 17, 50257),
        (2, 65, 32000),
        (2, 5, 151936),
    ];
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for (b, t, v) in shapes {
            for scale in [1.0, 4.0, 30.0] {
                // One batch row more than used: the used rows start at an offset of T·V elements,
                // which for odd V is not 16-byte aligned.
                for offset in [0, 1] {
                    let big = (Tensor::randn([b + offset, t, v], (Kind::Float, device)) * scale)
                        .to_kind(kind);
                    let logits = big.narrow(0, offset, b);
                    assert!(logits.is_contiguous());
                    let ids = Tensor::randint(v, [b, t], (Kind::Int64, device));
                    let ((f, f_ok), (r, r_ok)) = both(&logits, &ids);
                    let what = format!("{kind:?} b{b} t{t} v{v} x{scale} offset {offset}");
                    assert!(f_ok && r_ok, "{what}: finite");
                    assert_eq!(f.size(), vec![b, t - 1], "{what}");
                    assert_eq!(f.kind(), Kind::Float, "{what}");
                    let w = worst(&f, &r);
                    assert!(w <= 1.0, "{what}: {w} of the tolerance");
                }
            }
        }
    }
}

/// A NaN or infinite logit at a predicting position: not finite, on both paths, and the fused
/// loss of that position is NaN; at a row's last position it is not looked at.
#[test]
fn non_finite_logits_are_reported_like_libtorch() {
    let Some(device) = cuda() else { return };
    let _guard = tch::no_grad_guard();
    tch::manual_seed(14);
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
        for (b, t, v) in [(2, 5, 7), (2, 6, 1003), (3, 4, 50257)] {
            // Index 0 is in the scalar head (rows after the first of odd V are unaligned),
            // v/2 in the vectors, v-1 in the tail.
            for index in [0, v / 2, v - 1] {
                for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                    let logits = Tensor::randn([b, t, v], (Kind::Float, device)).to_kind(kind);
                    let ids = Tensor::randint(v, [b, t], (Kind::Int64, device));
                    let what = format!("{kind:?} b{b} t{t} v{v} [1, 2, {index}] = {bad}");
                    let _ = logits.get(1).get(2).narrow(0, index, 1).fill_(bad);
                    let ((f, f_ok), (_, r_ok)) = both(&logits, &ids);
                    assert!(!f_ok && !r_ok, "{what}");
                    assert!(f.double_value(&[1, 2]).is_nan(), "{what}: NaN loss");
                    assert!(f.double_value(&[0, 0]).is_finite(), "{what}: other rows");
                    // At the row's last position: nothing reads it.
                    let logits = Tensor::randn([b, t, v], (Kind::Float, device)).to_kind(kind);
                    let _ = logits.get(1).get(t - 1).narrow(0, index, 1).fill_(bad);
                    let ((f, f_ok), (r, r_ok)) = both(&logits, &ids);
                    assert!(f_ok && r_ok, "{what}, last position");
                    assert!(worst(&f, &r) <= 1.0, "{what}, last position");
                }
            }
        }
    }
}

fn binary() -> PathBuf {
    std::env::var_os("MASKAUDIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_maskaudit")))
}

fn fixtures() -> PathBuf {
    std::env::var_os("MASKAUDIT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

/// `maskaudit check` of the fixture on the GPU with `env`: the JSON report and stderr.
fn fixture_check(extra: &[&str], env: &[(&str, &str)]) -> (serde_json::Value, String) {
    let dir = fixtures();
    let out = Command::new(binary())
        .arg("check")
        .arg(dir.join("tiny_lm.pt"))
        .arg(dir.join("ragged.jsonl"))
        .args(["--pad-id", "0", "--batch-size", "4", "--device", "cuda"])
        .args(["--format", "json", "--quiet"])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .expect("run maskaudit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"));
    (report, stderr)
}

/// `maskaudit check` of the fixture on the GPU, as JSON.
fn audit(extra: &[&str], fused: bool) -> serde_json::Value {
    let fused = if fused { "1" } else { "0" };
    fixture_check(extra, &[("MASKAUDIT_FUSED_CE", fused)]).0
}

fn masked_mean(report: &serde_json::Value) -> f64 {
    report["losses"]["masked_token_mean"].as_f64().unwrap()
}

/// The fixture in float32 without TF32 on the GPU equals PyTorch's float32 on the CPU
/// (expected.json) with either cross-entropy, and bf16 and f16 agree between the two; the JSON
/// says which ran.
#[test]
fn the_fixture_on_the_gpu_matches_pytorch() {
    if cuda().is_none() {
        return;
    }
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let want = expected["cases"][0]["losses"]["masked_token_mean"]
        .as_f64()
        .unwrap();
    let f32_run = ["--dtype", "float32", "--tf32", "off"];
    let fused = audit(&f32_run, true);
    let libtorch = audit(&f32_run, false);
    assert_eq!(fused["model"]["cross_entropy"], "fused-cuda");
    assert_eq!(libtorch["model"]["cross_entropy"], "libtorch");
    for (name, report) in [("fused", &fused), ("libtorch", &libtorch)] {
        let got = masked_mean(report);
        assert!(
            ((got - want) / want).abs() < 1e-7,
            "{name}: {got} vs expected.json's {want}"
        );
        assert_eq!(
            report["data"]["positions"], expected["cases"][0]["positions"],
            "{name}"
        );
    }
    for dtype in ["bfloat16", "float16"] {
        let a = masked_mean(&audit(&["--dtype", dtype], true));
        let b = masked_mean(&audit(&["--dtype", dtype], false));
        assert!(
            ((a - b) / b).abs() < 1e-6,
            "{dtype}: fused {a}, libtorch {b}"
        );
    }
}

/// `check` on the GPU with `env`, with an HTML report: the JSON, and the HTML's token-view rows.
fn audit_with_html(model: &str, env: &[(&str, &str)]) -> (serde_json::Value, usize) {
    let dir = fixtures();
    let html = std::env::temp_dir().join(format!(
        "maskaudit-cuda-{}-{}.html",
        std::process::id(),
        env.len()
    ));
    let out = Command::new(binary())
        .arg("check")
        .arg(dir.join(model))
        .arg(dir.join("ragged.jsonl"))
        .args(["--pad-id", "0", "--batch-size", "2", "--device", "cuda"])
        .args(["--format", "json", "--quiet", "--html-rows", "40", "--html"])
        .arg(&html)
        .envs(env.iter().copied())
        .output()
        .expect("run maskaudit");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
    let rows = std::fs::read_to_string(&html)
        .unwrap()
        .matches("<tr class=\"token-row\"")
        .count();
    std::fs::remove_file(&html).unwrap();
    (report, rows)
}

/// A plain audit on the GPU probes on a thread of its own, beside the batches (`check`'s
/// overlap); with the overlap off, the probe runs inline on the first batch. Both must report
/// the same probe, findings, losses and HTML rows (the threaded path reads its batches' rows
/// for the token view as they come back), for float32 and float16 models and for one whose
/// logits depend on the batch's length.
#[test]
fn the_probe_beside_the_batches_reports_what_the_inline_probe_does() {
    if cuda().is_none() {
        return;
    }
    for model in ["tiny_lm.pt", "tiny_lm_half.pt", "odd/length_leak.pt"] {
        let (threaded, threaded_rows) = audit_with_html(model, &[]);
        let (inline, inline_rows) = audit_with_html(model, &[("MASKAUDIT_OVERLAP", "0")]);
        let probe = &threaded["model"]["consistency"];
        assert_eq!(probe["ran"], true, "{model}: {probe}");
        assert_eq!(probe, &inline["model"]["consistency"], "{model}");
        assert_eq!(threaded["findings"], inline["findings"], "{model}");
        assert_eq!(threaded["losses"], inline["losses"], "{model}");
        assert_eq!(threaded["verdict"], inline["verdict"], "{model}");
        // ragged.jsonl has more rows than one batch of 2, fewer than the 40 the view shows.
        let rows = threaded["data"]["rows"].as_u64().unwrap() as usize;
        assert!(rows > 2 && rows < 40, "{rows}");
        assert_eq!((threaded_rows, inline_rows), (rows, rows), "{model}");
    }
}

/// The fixture's audit with the kernel cache in `cache` (`MASKAUDIT_CACHE`): the masked mean,
/// and where `MASKAUDIT_TIMING` says the fused kernels came from.
fn audit_with_cache(cache: &str) -> (f64, String) {
    let env = [
        ("MASKAUDIT_CACHE", cache),
        ("MASKAUDIT_TIMING", "1"),
        ("MASKAUDIT_FUSED_CE", "1"),
    ];
    let (report, stderr) = fixture_check(&["--dtype", "bfloat16"], &env);
    assert_eq!(report["model"]["cross_entropy"], "fused-cuda", "{stderr}");
    let origin = stderr
        .lines()
        .find_map(|l| l.split_once("fused kernels: ").map(|(_, o)| o.to_string()))
        .unwrap_or_else(|| panic!("no kernel origin in: {stderr}"));
    (masked_mean(&report), origin)
}

/// The first run compiles and stores the machine code; the next reads it and computes the
/// same losses; a damaged file is compiled again and replaced; `off` stores nothing.
#[test]
fn the_kernel_cache_is_filled_then_read_and_a_damaged_file_is_replaced() {
    if cuda().is_none() {
        return;
    }
    let root = std::env::temp_dir().join(format!("maskaudit-kcache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let cache = root.to_str().unwrap();
    let files = || -> Vec<PathBuf> {
        std::fs::read_dir(root.join("kernels"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };

    let (compiled, origin) = audit_with_cache(cache);
    assert_eq!(origin, "compiled by NVRTC");
    let stored = files();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(stored[0].to_string_lossy().ends_with(".cubin"));

    let (cached, origin) = audit_with_cache(cache);
    assert_eq!(origin, "machine code from the cache");
    assert_eq!(cached, compiled);

    let whole = std::fs::read(&stored[0]).unwrap();
    let mut damaged = whole.clone();
    let mid = damaged.len() / 2;
    damaged[mid] ^= 0x55;
    std::fs::write(&stored[0], &damaged).unwrap();
    let (again, origin) = audit_with_cache(cache);
    assert_eq!(origin, "compiled by NVRTC");
    assert_eq!(again, compiled);
    assert_eq!(std::fs::read(&stored[0]).unwrap(), whole, "replaced whole");
    assert_eq!(audit_with_cache(cache).1, "machine code from the cache");

    std::fs::remove_dir_all(&root).unwrap();
    let (off, origin) = audit_with_cache("off");
    assert_eq!(origin, "compiled by NVRTC");
    assert_eq!(off, compiled);
    assert!(!root.exists(), "off stores nothing");
}
