//! `check` with a policy or preference loss: rollouts (or chosen/rejected pairs) through the
//! model, the loss's weights by autograd (`loss::policy`), a report whose `user_loss` carries
//! the aggregation. No cross-entropy aggregates: `losses` are null.

use anyhow::Result;

use super::{model_info, CheckOptions, LossSource};
use crate::data::rollout::{self, Needs};
use crate::data::{display_path, Unit};
use crate::findings::Finding;
use crate::lint::{LintOptions, LintState};
use crate::model::consistency::Consistency;
use crate::model::LoadedModel;
use crate::report::{DataSummary, Report, Verdict, SCHEMA_VERSION};
use maskaudit_core::loss::aggregate::LossTotals;
use maskaudit_core::loss::diagnosis::ProbeResult;
use maskaudit_core::loss::policy_aggregation::MicroTotals;
use maskaudit_core::loss::rollout_batch::{batch, RolloutBatch};
use maskaudit_core::loss::user::{LossArg, Probes, UserLossReport};
use maskaudit_core::loss::weights::GradientSummary;
use maskaudit_torch::loss::policy::{self as policy_loss, LossKind, PolicyAudit};
use maskaudit_torch::loss::user::UserLoss;

/// The kind of the loss `--loss-args` describes; None for a cross-entropy loss.
pub(super) fn kind(opts: &CheckOptions) -> Result<Option<LossKind>> {
    let Some(l) = &opts.loss else {
        return Ok(None);
    };
    let kind = policy_loss::kind_of(&l.args).map_err(|e| anyhow::anyhow!(e))?;
    if kind.is_some() {
        if let LossSource::Method(m) = &l.source {
            anyhow::bail!("--loss-method {m}: a policy or preference loss is a --loss FILE");
        }
        if opts.steps.is_some_and(|s| s.drop_last) {
            anyhow::bail!("--drop-last: not supported for a policy loss");
        }
    }
    Ok(kind)
}

/// Long because it is the policy run's outline: read, batch, observe, steps, report.
pub(super) fn run(opts: &CheckOptions, model: &dyn LoadedModel, kind: LossKind) -> Result<Report> {
    let l = opts.loss.as_ref().expect("a policy run has a loss");
    let LossSource::File(file) = &l.source else {
        unreachable!("refused by kind()")
    };
    let loss = UserLoss::from_file(file, model.device(), l.args.clone())?;
    let mut audit = PolicyAudit::new(loss, kind, l.probes, l.expect_aggregation);
    let vocab = model.vocab_size();
    let pad = opts.pad_id.unwrap_or(0);
    let path = display_path(&opts.data);
    let check_ids = |rows: &[&rollout::RolloutRow]| -> Result<()> {
        for r in rows {
            if let Some((i, id)) = r.input_ids.iter().enumerate().find(|(_, &id)| id >= vocab) {
                anyhow::bail!("{path}:{}: input_ids: token id {id} at index {i} is outside the model's vocabulary (size {vocab})", r.line);
            }
        }
        Ok(())
    };
    let mut lint = LintState::new(LintOptions {
        pad_id: opts.pad_id,
        eos_id: opts.eos_id,
        shifted: false,
        batch_size: Some(opts.batch_size),
        unit: Unit::Line,
    });
    let mut batches: Vec<RolloutBatch> = vec![];
    match kind {
        LossKind::Policy => {
            let needs = Needs {
                advantages: l.args.contains(&LossArg::Advantages),
            };
            let rows = rollout::read_rollouts(&opts.data, &opts.fields, needs)?;
            check_ids(&rows.iter().collect::<Vec<_>>())?;
            for r in &rows {
                lint.observe(&as_row(r));
            }
            for chunk in rows.chunks(opts.batch_size) {
                batches.push(batch(chunk, pad, 0));
            }
            observe_policy(opts, model, &mut audit, &batches)?;
        }
        LossKind::Preference => {
            let pairs = rollout::read_pairs(&opts.data, &opts.fields)?;
            for chunk in pairs.chunks(opts.batch_size) {
                let chosen: Vec<_> = chunk.iter().map(|p| p.chosen.clone()).collect();
                let rejected: Vec<_> = chunk.iter().map(|p| p.rejected.clone()).collect();
                check_ids(&chosen.iter().chain(&rejected).collect::<Vec<_>>())?;
                for r in chosen.iter().chain(&rejected) {
                    lint.observe(&as_row(r));
                }
                // One width for both halves, as trl's collator pads them together.
                let width = chosen
                    .iter()
                    .chain(&rejected)
                    .map(|r| r.input_ids.len())
                    .max()
                    .unwrap_or(2);
                let (c, r) = (batch(&chosen, pad, width), batch(&rejected, pad, width));
                audit.observe_preference(model, &c, &r)?;
                batches.push(c);
                batches.push(r);
            }
        }
    }
    let (policy, findings) = audit.finish();
    let (statistics, _) = lint.finish();
    let mut findings: Vec<Finding> = findings;
    opts.overrides.apply(&mut findings);
    let verdict = Verdict::of(&findings);
    let aggregation = policy.classification.aggregation.map(|a| a.name());
    let verdict_sentence = match (&policy.kind, aggregation, policy.preference_logps) {
        (&"policy", Some(a), _) => format!(
            "your policy loss aggregates as {a}; sequence weight {}",
            policy.classification.length_bias
        ),
        (&"policy", None, _) => format!(
            "your policy loss matches no known aggregation: {}",
            policy.classification.note
        ),
        (_, _, Some(s)) => {
            format!("your preference loss takes the {s} of each response's log-probs")
        }
        _ => "your preference loss's per-sequence statistic was not recognised".to_string(),
    };
    let user_loss = UserLossReport {
        source: file.display().to_string(),
        args: l.args.iter().map(|a| a.name()).collect(),
        value: policy.data_pass.as_ref().and_then(|d| d.value),
        reference: None,
        matched: None,
        candidates: vec![],
        max_relative_error: None,
        rtol: l.rtol,
        max_relative_tolerance: None,
        batches: policy.batches,
        verdict: verdict_sentence,
        hypotheses: vec![],
        probes: Probes {
            padding: ProbeResult::skipped("see policy.padding_probe"),
            masked_logits: ProbeResult::skipped("a policy loss takes no logits"),
        },
        gradient: GradientSummary::of(vec![], "a policy loss: see policy".into()),
        aggregation,
        policy: Some(policy),
    };
    let totals = LossTotals::default();
    let positions: u64 = batches.iter().map(|b| (b.rows * b.targets()) as u64).sum();
    let trained: u64 = batches.iter().map(|b| b.trained()).sum();
    let padding: u64 = batches
        .iter()
        .flat_map(|b| &b.kinds)
        .filter(|&&k| k == maskaudit_core::loss::policy_aggregation::TargetKind::Padding)
        .count() as u64;
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        model: model_info(model, opts, model.device(), false, Consistency::default()),
        data: DataSummary {
            path: path.clone(),
            rows: batches.iter().map(|b| b.rows as u64).sum(),
            batches: batches.len() as u64,
            batch_size: opts.batch_size,
            pad_id: opts.pad_id,
            positions,
            supervised_positions: trained,
            padding_fraction: (positions > 0).then(|| padding as f64 / positions as f64),
            padding_target_positions: padding,
            padding_trained_positions: 0,
            untrained_real_target_positions: positions
                .saturating_sub(trained)
                .saturating_sub(padding),
            mask_source: statistics.mask_source.clone(),
            records: Unit::Line,
            packing: None,
            capture: None,
        },
        statistics,
        losses: totals.aggregates(),
        contamination: None,
        user_loss: Some(user_loss),
        steps: None,
        ranks: None,
        findings,
        verdict,
        token_rows: vec![],
    })
}

/// The rollout batches through the loss; with `--accum`/`--world-size`, each step's total
/// weight against the same micro-batches normalised alone.
fn observe_policy(
    opts: &CheckOptions,
    model: &dyn LoadedModel,
    audit: &mut PolicyAudit,
    batches: &[RolloutBatch],
) -> Result<()> {
    let per_step = opts.steps.map_or(1, |s| s.micro_batches_per_step());
    for (index, step) in batches.chunks(per_step).enumerate() {
        let count: i64 = step.iter().map(|b| b.trained() as i64).sum();
        let mut micro = vec![];
        for b in step {
            let alone = audit.observe_policy(model, b)?;
            let in_step = if opts.steps.is_some() && audit.takes_count() {
                audit.total_with_count(model, b, count)?
            } else {
                alone
            };
            micro.push(MicroTotals {
                line: b.lines[0],
                trained: b.trained(),
                alone,
                in_step,
            });
        }
        if opts.steps.is_some() {
            audit.push_step(index + 1, &micro, per_step);
        }
    }
    Ok(())
}

/// A rollout row as the lint statistics see it.
fn as_row(r: &rollout::RolloutRow) -> crate::data::Row {
    let mut row = crate::data::Row::new(r.line, r.input_ids.clone());
    row.mask = r.mask.clone();
    row.attention_mask = r.attention_mask.clone();
    row.mask_source = crate::data::MaskSource::LossMask;
    row
}
