//! The policy section in the Markdown and HTML reports: the same lines as the table, the
//! cross-entropy aggregates (all n/a on this path) left out.

mod common;

use common::*;

const POLICY: &str = "logprobs,old_logprobs,advantages,response_mask";

#[test]
fn markdown_and_html_show_the_policy_section() {
    let dir = std::env::temp_dir().join(format!("maskaudit-rl-reports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let html = dir.join("report.html");
    let (data, loss) = (
        fixture("rl/rollouts.jsonl"),
        fixture("rl/losses/dr_grpo.pt"),
    );
    let (json, _) = check_rl(&data, &loss, POLICY, &[]);
    let policy = &json["user_loss"]["policy"];
    let aggregation = format!(
        "{}, constant C = {}",
        policy["aggregation"].as_str().unwrap(),
        policy["constant"].as_f64().unwrap()
    );
    let (model, html_path) = (fixture("tiny_lm.pt"), html.display().to_string());
    let out = maskaudit(&[
        "check",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        &model,
        &data,
        "--loss",
        &loss,
        "--loss-args",
        POLICY,
        "--format",
        "markdown",
        "--html",
        &html_path,
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let md = &out.stdout;
    assert!(
        md.contains(&format!("| aggregation | {aggregation} |")),
        "{md}"
    );
    assert!(md.contains("| NaN probe | passed"), "{md}");
    assert!(!md.contains("| aggregate |"), "{md}");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(
        page.contains(&format!("<th>aggregation</th><td>{aggregation}</td>")),
        "{page}"
    );
    assert!(!page.contains("<h2>Aggregates</h2>"));
    std::fs::remove_dir_all(&dir).ok();
}
