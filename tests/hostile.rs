//! Hostile input: models and losses that misbehave, data and arguments that are malformed.
//! Every case ends in a clear exit code, never a panic, an abort or a silent pass. The odd
//! models come from `fixtures/generate.py odd`.

mod common;

use common::*;
use serde_json::Value;

const DATA: &str = "fixtures/padded_labels.jsonl";

fn odd(name: &str) -> String {
    fixture(&format!("odd/{name}.pt"))
}

fn json_of(out: &Output) -> Value {
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {out:?}"))
}

fn check(model: &str, extra: &[&str]) -> Output {
    let mut args = vec!["check", "--device", "cpu", model, DATA, "--batch-size", "4"];
    args.extend_from_slice(extra);
    maskaudit(&args)
}

fn masked_token_mean(out: &Output) -> f64 {
    json_of(out)["losses"]["masked_token_mean"]
        .as_f64()
        .unwrap_or_else(|| panic!("{out:?}"))
}

// ---- models and losses ----

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
