//! `maskaudit.capture` (python/maskaudit) on real trainers: a trl SFTTrainer with gradient
//! accumulation, and a plain loop through the forward hook, captured by
//! tests/export/capture_runs.py (`make hf-models`, under target/hf-models/capture; it also
//! fails unless training is identical with and without the capture). `check` reads the
//! Parquet capture as the trainer batched it and gives the trainer's numbers.

mod common;

use std::path::PathBuf;

use common::*;
use serde_json::Value;

fn dir() -> PathBuf {
    hf_models("capture", "model.pt")
}

/// `check` of one captured case with the model it was captured from, its JSON report, and
/// the exit status; `extra` arguments after the data (`--pad-id 0` unless they give one). No
/// --batch-size: a capture is batched as the trainer batched it (the default of 8 would merge
/// micro-batches).
fn check(case: &str, extra: &[&str]) -> (Value, Output) {
    let dir = dir();
    let model = dir.join("model.pt").display().to_string();
    let data = dir.join(case).join("run.parquet").display().to_string();
    let mut args = vec![
        "check", "--device", "cpu", "--format", "json", &model, &data,
    ];
    if !extra.contains(&"--pad-id") {
        args.extend_from_slice(&["--pad-id", "0"]);
    }
    args.extend_from_slice(extra);
    let out = maskaudit(&args);
    let json = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{case}: {e}: {out:?}"));
    (json, out)
}

/// The codes of the report's findings of one severity, in order.
fn codes<'a>(json: &'a Value, severity: &str) -> Vec<&'a str> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == severity)
        .map(|f| f["code"].as_str().unwrap())
        .collect()
}

#[test]
fn a_capture_is_checked_with_the_trainers_numbers() {
    for case in ["sft_accumulation", "plain_loop"] {
        let expected: Value = serde_json::from_str(
            &std::fs::read_to_string(dir().join(case).join("expected.json")).unwrap(),
        )
        .unwrap();
        let (json, out) = check(case, &[]);
        let mut loud = codes(&json, "error");
        loud.extend(codes(&json, "warning"));
        // The plain loop divides each micro-batch's own mean by the accumulation, as most
        // hand-written loops do: a mean of micro-batch means, which the capture shows.
        let (code, want_loud) = match case {
            "plain_loop" => (1, vec!["accumulation-misweighted"]),
            _ => (0, vec![]),
        };
        assert_eq!(out.code, code, "{case}: {out:?}");
        assert_eq!(loud, want_loud, "{case}: {}", json["findings"]);
        let verdict = json["data"]["capture"]["trainer_verdict"].as_str().unwrap();
        assert!(
            verdict.starts_with("the trainer's loss is the masked token mean"),
            "{case}: {verdict}"
        );
        assert_eq!(json["data"]["batches"], expected["micro_batches"], "{case}");
        assert_eq!(
            json["data"]["supervised_positions"], expected["trained"],
            "{case}"
        );
        // Exact against the eager model in float64; the trainer's own float32 number (trl's
        // fused LM head) is within its rounding.
        let got = json["losses"]["masked_token_mean"].as_f64().unwrap();
        let want = expected["token_mean"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= 1e-6 * want,
            "{case}: maskaudit {got}, exact {want}"
        );
        let trainer = expected["trainer_token_mean"].as_f64().unwrap();
        assert!(
            (got - trainer).abs() <= 1e-4 * trainer,
            "{case}: maskaudit {got}, the trainer's {trainer}"
        );
        let capture = &json["data"]["capture"];
        assert_eq!(
            capture["micro_batches"], expected["micro_batches"],
            "{case}"
        );
        let read = capture["trainer_token_mean"].as_f64().unwrap();
        assert!(
            (read - trainer).abs() <= 1e-9 * trainer,
            "{case}: {capture}"
        );
        // The trainer passed num_items_in_batch in the SFT run, and logged every step's loss;
        // the plain loop has neither.
        let sft = case == "sft_accumulation";
        assert_eq!(
            capture["counts_compared"],
            u64::from(sft),
            "{case}: {capture}"
        );
        let logged = capture["logged_steps"].as_array().unwrap();
        assert_eq!(logged.len(), usize::from(sft), "{case}: {capture}");
        for step in logged {
            let (l, t) = (
                step["logged"].as_f64().unwrap(),
                step["token_mean"].as_f64().unwrap(),
            );
            assert!((l - t).abs() <= 1e-4 * t, "{case}: {step}");
        }
    }
}

/// A trainer whose num_items_in_batch counts one token per row too many (labels counted
/// before the shift) divides by the wrong count: an error, naming the step.
#[test]
fn a_wrong_num_items_in_batch_is_an_error() {
    let (json, out) = check("count_before_shift", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let finding = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "trainer-count-mismatch")
        .unwrap_or_else(|| panic!("{}", json["findings"]));
    assert_eq!(finding["severity"], "error");
    assert!(
        finding["message"]
            .as_str()
            .unwrap()
            .contains("first at step 0 (rank 0)"),
        "{finding}"
    );
}

/// The founding bug inside a trainer (F.cross_entropy's default mean over every position, in
/// an SFTTrainer subclass that also ignores num_items_in_batch): the trainer's loss is named
/// for what it is, and the accumulation it then skips is an error too.
#[test]
fn a_trainer_loss_over_every_position_is_named() {
    let (json, out) = check("sft_over_all_positions", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let codes = codes(&json, "error");
    assert_eq!(
        codes,
        ["loss-includes-padding", "accumulation-misweighted"],
        "{}",
        json["findings"]
    );
    let verdict = json["data"]["capture"]["trainer_verdict"].as_str().unwrap();
    assert!(
        verdict.starts_with("the trainer's loss is the mean over all positions"),
        "{verdict}"
    );
    // The step it logged reads about twice the truth: two micro-batch means, summed.
    let warned = json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "logged-loss-mismatch" && f["severity"] == "warning");
    assert!(warned, "{}", json["findings"]);
}

/// transformers' ForCausalLMLoss, unedited, traced by maskaudit.trace_loss, audited on the
/// captured run: the masked token mean, as it is and normalised by num_items_in_batch.
#[test]
fn a_traced_transformers_loss_is_audited() {
    for (file, args) in [
        ("for_causal_lm.pt", "logits,labels"),
        (
            "for_causal_lm_num_items.pt",
            "logits,labels,num_items_in_batch",
        ),
    ] {
        let loss = dir().join("losses").join(file).display().to_string();
        let (json, out) = check("sft_accumulation", &["--loss", &loss, "--loss-args", args]);
        assert_eq!(out.code, 0, "{file}: {out:?}");
        assert_eq!(
            json["user_loss"]["matched"], "masked_token_mean",
            "{file}: {}",
            json["user_loss"]
        );
    }
}

/// The collator bugs, from a real SFTTrainer's capture: pad = eos with every pad id's label
/// set to -100 (EOS never trained), and labels that are the input ids (padding trained, which
/// the trainer's loss then includes).
#[test]
fn collator_bugs_are_caught_from_the_capture() {
    for (case, pad, code) in [
        ("sft_eos_masked", "2", "eos-masked"),
        ("sft_padding_trained", "0", "padding-trained"),
    ] {
        let (json, out) = check(case, &["--pad-id", pad, "--eos-id", "2"]);
        assert_eq!(out.code, 1, "{case}: {out:?}");
        assert_eq!(
            codes(&json, "error"),
            [code],
            "{case}: {}",
            json["findings"]
        );
    }
    let (json, _) = check("sft_padding_trained", &[]);
    let verdict = json["data"]["capture"]["trainer_verdict"].as_str().unwrap();
    assert!(
        verdict.contains("so the loss includes padding"),
        "{verdict}"
    );
}

/// A Trainer whose model does not accept loss kwargs divides each micro-batch's own mean by the
/// accumulation: accumulation-misweighted, from the captured run itself.
#[test]
fn a_mean_of_micro_batch_means_in_a_trainer_is_caught() {
    let (json, out) = check("sft_no_loss_kwargs", &[]);
    assert_eq!(out.code, 1, "{out:?}");
    let errors = codes(&json, "error");
    assert_eq!(errors, ["accumulation-misweighted"], "{}", json["findings"]);
}

/// trl's packing=True: padding-free rows of several documents, run with their own position ids
/// through the packed export, give the per-document truth and the trainer's loss. (The rows
/// are longer than the lengths the exporter verified: that warning is the exporter's, and
/// only errors are held here.)
#[test]
fn a_packed_trl_run_gives_the_per_document_truth() {
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("sft_packing/expected.json")).unwrap(),
    )
    .unwrap();
    let (json, out) = check("sft_packing", &[]);
    assert_eq!(out.code, 0, "{out:?}");
    assert!(json["data"]["packing"]["packed_rows"].as_u64().unwrap() > 0);
    let got = json["losses"]["masked_token_mean"].as_f64().unwrap();
    let want = expected["token_mean"].as_f64().unwrap();
    assert!(
        (got - want).abs() <= 1e-6 * want,
        "maskaudit {got}, exact {want}"
    );
    let verdict = json["data"]["capture"]["trainer_verdict"].as_str().unwrap();
    assert!(verdict.contains("masked_token_mean"), "{verdict}");
}

/// A capture whose settings are not JSON, or that lacks its step column, is bad input: one
/// line naming the file, exit 2, no report.
#[test]
fn a_broken_capture_is_a_usage_error() {
    let dir = dir();
    let model = dir.join("model.pt").display().to_string();
    for (file, expect) in [
        ("bad_settings.parquet", "maskaudit.capture: not JSON"),
        (
            "no_step.parquet",
            "a capture without its maskaudit_step column",
        ),
    ] {
        let data = dir.join("broken").join(file).display().to_string();
        let out = maskaudit(&["check", "--device", "cpu", &model, &data, "--pad-id", "0"]);
        assert_usage_error(&out, expect);
        assert!(out.stderr.contains(file), "{file}: {out:?}");
        assert!(out.stdout.is_empty(), "{file}: {out:?}");
    }
}
