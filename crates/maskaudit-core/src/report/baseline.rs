//! Baselines: findings a team has accepted, so that a run fails only on new ones.
//!
//! `--write-baseline FILE` writes a run's findings; `--baseline FILE` reads such a file and
//! downgrades every finding whose code *and* data path match an entry: it stays in the
//! report, marked `baselined` (a `"baselined": true` key in the JSON, "(baselined)" after its
//! message), as information, so it never fails the run. Paths are compared as strings, as
//! given on the command line (`data.jsonl` and `./data.jsonl` differ): run CI from the same
//! directory with the same path that wrote the baseline. A baseline is applied after
//! `--deny`/`--warn`/`--allow`, so it wins over them.
//!
//! The file (JSON, `baseline_version` 1):
//!
//! ```json
//! {
//!   "baseline_version": 1,
//!   "findings": [
//!     { "code": "padding-trained", "data": "data/train.jsonl",
//!       "severity": "error", "message": "…" }
//!   ]
//! }
//! ```
//!
//! `severity` and `message` are for people reading the file; only `code` and `data` match.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::findings::{Code, Finding, Severity};

/// Bumped when an entry's key changes meaning or disappears.
pub const BASELINE_VERSION: u32 = 1;

/// One accepted finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub code: String,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub baseline_version: u32,
    pub findings: Vec<Entry>,
}

impl Baseline {
    /// The findings of a run on `data`, as a baseline.
    pub fn of(findings: &[Finding], data: &str) -> Self {
        Self {
            baseline_version: BASELINE_VERSION,
            findings: findings
                .iter()
                .map(|f| Entry {
                    code: f.code.name().to_string(),
                    data: data.to_string(),
                    severity: Some(f.severity.to_string()),
                    message: Some(f.message.clone()),
                })
                .collect(),
        }
    }

    /// Reads a baseline; a missing file, bad JSON, another version or an unknown code is an
    /// error naming the file.
    pub fn load(path: &Path) -> Result<Self> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{shown}: cannot read the baseline"))?;
        let baseline: Baseline = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{shown}: not a maskaudit baseline: {e}"))?;
        if baseline.baseline_version != BASELINE_VERSION {
            anyhow::bail!(
                "{shown}: baseline_version {} is not supported (this maskaudit reads {BASELINE_VERSION}); write it again with --write-baseline",
                baseline.baseline_version
            );
        }
        for entry in &baseline.findings {
            entry
                .code
                .parse::<Code>()
                .map_err(|e| anyhow!("{shown}: {e}"))?;
        }
        Ok(baseline)
    }

    /// Writes the baseline as pretty JSON.
    pub fn write<W: std::io::Write>(&self, out: &mut W) -> std::io::Result<()> {
        serde_json::to_writer_pretty(&mut *out, self)?;
        writeln!(out)
    }

    /// Downgrades the findings this baseline accepts; returns how many.
    pub fn apply(&self, findings: &mut [Finding], data: &str) -> usize {
        let mut accepted = 0;
        for f in findings {
            let known = self
                .findings
                .iter()
                .any(|e| e.code == f.code.name() && e.data == data);
            if known && !f.baselined {
                f.baselined = true;
                f.severity = Severity::Info;
                f.message.push_str(" (baselined)");
                accepted += 1;
            }
        }
        accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Verdict;

    #[test]
    fn baselined_findings_match_code_and_path_and_stop_failing() {
        let found = vec![
            Finding::new(Code::PaddingTrained, Severity::Error, "p"),
            Finding::new(Code::EosMissing, Severity::Warning, "e"),
        ];
        let baseline = Baseline::of(&found[..1], "d.jsonl");
        let json = serde_json::to_string(&baseline).unwrap();
        let back: Baseline = serde_json::from_str(&json).unwrap();
        assert_eq!(back, baseline);

        let mut other_path = found.clone();
        assert_eq!(baseline.apply(&mut other_path, "./d.jsonl"), 0);
        assert_eq!(Verdict::of(&other_path), Verdict::Fail);

        let mut same = found.clone();
        assert_eq!(baseline.apply(&mut same, "d.jsonl"), 1);
        assert_eq!(Verdict::of(&same), Verdict::Pass);
        assert!(same[0].baselined && same[0].message == "p (baselined)");
        assert_eq!(same[1], found[1]);
    }
}
