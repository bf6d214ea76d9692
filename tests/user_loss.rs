//! The user-loss audit through the real binary: every fixture loss is recognised as the formula
//! it computes, with the right codes, severities and exit status, on ragged and pre-padded data.

mod common;

use common::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Json {
    user_loss: UserLoss,
    findings: Vec<FindingJson>,
    verdict: String,
}

#[derive(Debug, Deserialize)]
struct UserLoss {
    source: String,
    args: Vec<String>,
    value: f64,
    matched: Option<String>,
    candidates: Vec<String>,
    max_relative_error: Option<f64>,
    rtol: f64,
    max_relative_tolerance: Option<f64>,
    batches: u64,
    verdict: String,
    hypotheses: Vec<Hypothesis>,
    probes: Probes,
}

#[derive(Debug, Deserialize)]
struct Hypothesis {
    name: String,
    value: Option<f64>,
    max_error_over_tolerance: Option<f64>,
    matches: bool,
}

#[derive(Debug, Deserialize)]
struct Probes {
    padding: Probe,
    masked_logits: Probe,
}

#[derive(Debug, Deserialize)]
struct Probe {
    ran: bool,
    passed: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct FindingJson {
    code: String,
    severity: String,
    message: String,
}

/// The two conventions the issue asks for: ragged rows padded by maskaudit, and pre-padded
/// Hugging Face rows with prompt masking.
const DATASETS: &[&[&str]] = &[&["ragged.jsonl", "--pad-id", "0"], &["padded_labels.jsonl"]];

fn audit(model: &str, dataset: &[&str], extra: &[&str]) -> (Json, Output) {
    let model = fixture(model);
    let data = fixture(dataset[0]);
    let mut args = vec![
        "check", "--format", "json", "--device", "cpu", &model, &data,
    ];
    args.extend_from_slice(&dataset[1..]);
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (json, out)
}

fn codes(json: &Json) -> Vec<(String, String)> {
    json.findings
        .iter()
        .filter(|f| f.code != "padding-contamination")
        .map(|f| (f.code.clone(), f.severity.clone()))
        .collect()
}

struct Case {
    file: &'static str,
    args: &'static str,
    matched: Option<&'static str>,
    /// The diagnosis finding, if any.
    code: Option<(&'static str, &'static str)>,
    padding_moves: bool,
    /// Whether the masked-logit probe must fail; `None`: depends on the data.
    leaks: Option<bool>,
    exit: i32,
}

const CASES: &[Case] = &[
    Case {
        file: "correct_labels",
        args: "logits,labels",
        matched: Some("masked_token_mean"),
        code: None,
        padding_moves: false,
        leaks: Some(false),
        exit: 0,
    },
    Case {
        file: "correct_shifted",
        args: "shift_logits,targets,loss_mask",
        matched: Some("masked_token_mean"),
        code: None,
        padding_moves: false,
        leaks: Some(false),
        exit: 0,
    },
    Case {
        file: "tuple_out",
        args: "logits,labels",
        matched: Some("masked_token_mean"),
        code: None,
        padding_moves: false,
        leaks: Some(false),
        exit: 0,
    },
    Case {
        file: "reduce_then_mask",
        args: "shift_logits,targets,loss_mask",
        matched: Some("all_positions_mean"),
        code: Some(("loss-includes-padding", "error")),
        padding_moves: true,
        leaks: Some(true),
        exit: 1,
    },
    Case {
        file: "pad_not_ignored",
        args: "logits,input_ids",
        matched: Some("all_positions_mean"),
        code: Some(("loss-includes-padding", "error")),
        padding_moves: true,
        leaks: Some(true),
        exit: 1,
    },
    Case {
        file: "mask_numel",
        args: "shift_logits,targets,loss_mask",
        matched: Some("masked_sum_over_all_positions"),
        code: Some(("padding-in-denominator", "error")),
        padding_moves: true,
        leaks: Some(false),
        exit: 1,
    },
    Case {
        file: "sequence_mean",
        args: "shift_logits,targets,loss_mask",
        matched: Some("sequence_mean"),
        code: Some(("sequence-weighted-mean", "warning")),
        padding_moves: false,
        leaks: Some(false),
        exit: 0,
    },
    Case {
        file: "double_shift",
        args: "shift_logits,labels",
        matched: Some("double_shift_token_mean"),
        code: Some(("off-by-one-shift", "error")),
        padding_moves: false,
        leaks: None,
        exit: 1,
    },
    Case {
        file: "no_shift",
        args: "logits,labels",
        matched: Some("unshifted_token_mean"),
        code: Some(("off-by-one-shift", "error")),
        padding_moves: false,
        leaks: None,
        exit: 1,
    },
    Case {
        file: "masked_sum",
        args: "shift_logits,targets,loss_mask",
        matched: Some("masked_sum"),
        code: Some(("unnormalized-sum", "warning")),
        padding_moves: false,
        leaks: Some(false),
        exit: 0,
    },
    Case {
        file: "scaled_wrong",
        args: "shift_logits,targets,loss_mask",
        matched: None,
        code: Some(("loss-mismatch", "error")),
        padding_moves: false,
        leaks: Some(false),
        exit: 1,
    },
    Case {
        file: "logits_leak",
        args: "logits,labels",
        matched: None,
        code: Some(("loss-mismatch", "error")),
        padding_moves: true,
        leaks: Some(true),
        exit: 1,
    },
];

#[test]
fn every_fixture_loss_is_recognised_on_ragged_and_padded_data() {
    for dataset in DATASETS {
        for case in CASES {
            let what = format!("{} on {}", case.file, dataset[0]);
            let loss = fixture(&format!("losses/{}.pt", case.file));
            let (json, out) = audit(
                "tiny_lm.pt",
                dataset,
                &["--loss", &loss, "--loss-args", case.args],
            );
            assert_eq!(out.code, case.exit, "{what}: {out:?}");
            let u = &json.user_loss;
            assert_eq!(u.matched.as_deref(), case.matched, "{what}: {}", u.verdict);
            assert_eq!(u.source, loss);
            assert_eq!(u.args.join(","), case.args);
            assert!(u.batches >= 4, "{what}");
            let found = codes(&json);
            if let Some((code, severity)) = case.code {
                assert!(
                    found.contains(&(code.to_string(), severity.to_string())),
                    "{what}: {found:?}"
                );
            }
            let has = |code: &str| found.iter().any(|(c, _)| c == code);
            assert_eq!(
                has("padding-variance"),
                case.padding_moves,
                "{what}: {found:?}"
            );
            assert_eq!(u.probes.padding.passed, Some(!case.padding_moves), "{what}");
            if let Some(leaks) = case.leaks {
                assert_eq!(has("masked-logits-leak"), leaks, "{what}: {found:?}");
            }
            assert_eq!(json.verdict, if case.exit == 0 { "pass" } else { "fail" });
            if let Some(m) = case.matched {
                let h = u.hypotheses.iter().find(|h| h.name == m).unwrap();
                assert!(h.matches);
                assert!(h.max_error_over_tolerance.unwrap() <= 1.0, "{what}: {h:?}");
                assert_eq!(u.rtol, 0.0, "{what}: no --rtol, no slack");
                let tolerance = u.max_relative_tolerance.unwrap();
                assert!(u.max_relative_error.unwrap() <= tolerance, "{what}");
                // The user's value is the matched formula's, averaged the same way.
                let rel = (u.value - h.value.unwrap()).abs() / h.value.unwrap().abs();
                assert!(rel <= tolerance, "{what}: {} vs {:?}", u.value, h.value);
            }
        }
    }
}

#[test]
fn the_verdict_sentence_names_the_formula_and_the_gap() {
    let loss = fixture("losses/reduce_then_mask.pt");
    let (json, _) = audit(
        "tiny_lm.pt",
        DATASETS[0],
        &[
            "--loss",
            &loss,
            "--loss-args",
            "shift_logits,targets,loss_mask",
        ],
    );
    let v = &json.user_loss.verdict;
    assert!(
        v.starts_with("your loss is the mean over all positions, padding included: "),
        "{v}"
    );
    assert!(v.contains("where the masked token mean is "), "{v}");
    let f = json
        .findings
        .iter()
        .find(|f| f.code == "loss-includes-padding")
        .unwrap();
    assert!(f.message.contains("reduction"), "{}", f.message);
    assert!(f.message.contains("ignore_index"), "{}", f.message);

    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        &fixture("ragged.jsonl"),
        "--pad-id",
        "0",
        "--loss",
        &loss,
        "--loss-args",
        "shift_logits,targets,loss_mask",
    ]);
    assert_eq!(out.code, 1);
    assert!(
        out.stdout
            .contains("your loss is the mean over all positions, padding included"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("probe padding: moved"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("error[loss-includes-padding]"),
        "{}",
        out.stdout
    );
}

#[test]
fn loss_methods_of_the_model_are_audited() {
    for dataset in DATASETS {
        // An @torch.jit.export method; the default arguments are input_ids,labels.
        let (json, out) = audit("tiny_lm_with_loss.pt", dataset, &["--loss-method", "loss"]);
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(json.user_loss.source, "fixtures/tiny_lm_with_loss.pt::loss");
        assert_eq!(json.user_loss.args, vec!["input_ids", "labels"]);
        assert_eq!(json.user_loss.matched.as_deref(), Some("masked_token_mean"));
        assert!(json.user_loss.probes.padding.ran);
        assert!(
            !json.user_loss.probes.masked_logits.ran,
            "no logits are passed to a method"
        );

        // Hugging Face style: forward returns {"loss", "logits"} when given labels.
        let (json, out) = audit(
            "tiny_lm_hf.pt",
            dataset,
            &[
                "--loss-method",
                "forward",
                "--loss-args",
                "input_ids,attention_mask,labels",
            ],
        );
        assert_eq!(out.code, 0, "{out:?}");
        assert_eq!(json.user_loss.matched.as_deref(), Some("masked_token_mean"));
    }
}

#[test]
fn probes_can_be_skipped_and_severities_overridden() {
    let loss = fixture("losses/reduce_then_mask.pt");
    let args = [
        "--loss",
        &loss,
        "--loss-args",
        "shift_logits,targets,loss_mask",
        "--no-probes",
    ];
    let (json, out) = audit("tiny_lm.pt", DATASETS[0], &args);
    assert_eq!(out.code, 1);
    assert!(!json.user_loss.probes.padding.ran);
    assert!(!json.user_loss.probes.masked_logits.ran);
    // The probes' findings are gone; the gradient weight map is no probe and still runs.
    assert_eq!(
        codes(&json),
        vec![
            ("loss-includes-padding".to_string(), "error".to_string()),
            ("gradient-trains-untrained".to_string(), "error".to_string())
        ]
    );

    let seq = fixture("losses/sequence_mean.pt");
    let base = [
        "--loss",
        &seq,
        "--loss-args",
        "shift_logits,targets,loss_mask",
    ];
    let (_, out) = audit("tiny_lm.pt", DATASETS[1], &base);
    assert_eq!(out.code, 0, "a warning by default");
    let mut denied = base.to_vec();
    denied.extend_from_slice(&["--deny", "sequence-weighted-mean"]);
    let (json, out) = audit("tiny_lm.pt", DATASETS[1], &denied);
    assert_eq!(out.code, 1, "{out:?}");
    assert_eq!(
        codes(&json),
        vec![("sequence-weighted-mean".to_string(), "error".to_string())]
    );
}

#[test]
fn indistinguishable_formulas_are_reported_not_guessed() {
    // Rows of one length, no padding, everything trained: the token mean, the all-positions
    // mean and the sequence mean coincide on every batch.
    let dir = TempDir::new("ambiguous");
    let rows: String = (0..8)
        .map(|i| format!("{{\"input_ids\":[1,{},{},{},2]}}\n", 3 + i, 5 + i, 7 + i))
        .collect();
    let data = dir.write("flat.jsonl", &rows);
    let loss = fixture("losses/correct_labels.pt");
    let out = maskaudit(&[
        "check",
        "--format",
        "json",
        "--device",
        "cpu",
        &fixture("tiny_lm.pt"),
        &data,
        "--loss",
        &loss,
    ]);
    let json: Json = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(json.user_loss.matched, None);
    // The padding probe passed, so the padding-dependent formulas are ruled out.
    assert_eq!(
        json.user_loss.candidates,
        vec!["masked_token_mean", "sequence_mean"]
    );
    assert_eq!(
        codes(&json),
        vec![
            ("no-padding".to_string(), "info".to_string()),
            ("loss-ambiguous".to_string(), "warning".to_string())
        ]
    );
    assert!(json.user_loss.verdict.contains("cannot be told apart"));
    assert_eq!(out.code, 0);
}

/// A loss that fails on any call fails the run, naming the batch: here the fourth call, the
/// second batch's, which a retry without autograd would have passed.
#[test]
fn a_loss_that_throws_on_a_later_call_fails_the_run() {
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        "fixtures/tiny_lm.pt",
        "fixtures/ragged.jsonl",
        "--pad-id",
        "0",
        "--batch-size",
        "4",
        "--loss",
        "fixtures/odd/throws_later_loss.pt",
    ]);
    assert_usage_error(&out, "boom on call 4");
    assert!(
        out.stderr
            .contains("your loss, on the batch starting at line 5"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty(), "no verdict: {out:?}");
}

/// A correct loss that writes into its inputs under no_grad after computing its value (zeroes
/// the logits, masks every label) moves none of maskaudit's probes: they run on copies.
#[test]
fn a_loss_that_edits_its_inputs_moves_no_probe() {
    let (json, out) = audit(
        "tiny_lm.pt",
        DATASETS[0],
        &["--loss", &fixture("odd/edits_inputs_loss.pt")],
    );
    assert_eq!(
        json.user_loss.matched.as_deref(),
        Some("masked_token_mean"),
        "{out:?}"
    );
    assert_eq!(json.user_loss.probes.padding.passed, Some(true), "{out:?}");
    assert_eq!(
        json.user_loss.probes.masked_logits.passed,
        Some(true),
        "{out:?}"
    );
    for (code, _) in codes(&json) {
        assert!(
            ![
                "padding-variance",
                "masked-logits-leak",
                "gradient-trains-untrained"
            ]
            .contains(&code.as_str()),
            "{code}: {out:?}"
        );
    }
}

#[test]
fn a_loss_that_throws_or_returns_a_vector_is_a_usage_error() {
    let base = [
        "check",
        "--device",
        "cpu",
        "fixtures/tiny_lm.pt",
        "fixtures/ragged.jsonl",
        "--pad-id",
        "0",
    ];
    let mut args = base.to_vec();
    args.extend_from_slice(&["--loss", "fixtures/losses/throws.pt"]);
    let out = maskaudit(&args);
    assert_usage_error(
        &out,
        "fixtures/losses/throws.pt: the loss failed: RuntimeError: boom",
    );
    assert!(
        out.stderr
            .contains("called with logits [8, 24, 48] Float, labels [8, 24] Int64"),
        "{out:?}"
    );

    let mut args = base.to_vec();
    args.extend_from_slice(&[
        "--loss",
        "fixtures/losses/returns_vector.pt",
        "--loss-args",
        "shift_logits,targets,loss_mask",
    ]);
    let out = maskaudit(&args);
    assert_usage_error(&out, "the loss returned a Float tensor of shape [8, 23]");

    let mut args = base.to_vec();
    args.extend_from_slice(&["--loss-method", "no_such_method"]);
    assert_usage_error(&maskaudit(&args), "Method 'no_such_method' is not defined");

    let mut args = base.to_vec();
    args.extend_from_slice(&["--loss", "fixtures/not_a_model.pt"]);
    assert_usage_error(
        &maskaudit(&args),
        "not_a_model.pt: not a TorchScript module",
    );

    let mut args = base.to_vec();
    args.extend_from_slice(&[
        "--loss",
        "fixtures/losses/correct_labels.pt",
        "--loss-args",
        "logits,nope",
    ]);
    let out = maskaudit(&args);
    assert_eq!(out.code, 2);
    assert!(
        out.stderr.contains("unknown loss argument 'nope'"),
        "{out:?}"
    );
}

#[test]
fn explain_prints_a_fix_for_every_loss_code() {
    for code in [
        "loss-includes-padding",
        "padding-in-denominator",
        "sequence-weighted-mean",
        "off-by-one-shift",
        "unnormalized-sum",
        "loss-mismatch",
        "loss-ambiguous",
        "padding-variance",
        "masked-logits-leak",
    ] {
        let out = maskaudit(&["explain", code]);
        assert_eq!(out.code, 0, "{out:?}");
        assert!(
            out.stdout.starts_with(&format!("{code}: ")),
            "{}",
            out.stdout
        );
    }
    let out = maskaudit(&["explain", "loss-includes-padding"]);
    assert!(out.stdout.contains("reduction=\"none\""), "{}", out.stdout);
    let out = maskaudit(&["explain", "nope"]);
    assert_usage_error(&out, "unknown finding code 'nope'");
}
