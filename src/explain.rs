//! `maskaudit explain CODE`: the long form of each finding code.

use crate::findings::Code;

pub fn explain(code: &str) -> anyhow::Result<String> {
    if code == "all" {
        let mut out = String::new();
        for c in Code::ALL {
            out.push_str(&format!("{:<28} {}\n", c.name(), c.description()));
        }
        return Ok(out);
    }
    let code: Code = code.parse().map_err(anyhow::Error::msg)?;
    Ok(format!(
        "{}: {}\n\n{}\n",
        code.name(),
        code.description(),
        long_form(code)
    ))
}

fn long_form(code: Code) -> &'static str {
    match code {
        Code::PaddingContamination => include_str!("explain/padding-contamination.md"),
        Code::NoPadding => "Every next-token position of every batch has a trained target, so a loss over all\npositions and the masked token mean are the same number. Nothing to fix; if you expected\npadding, check that --pad-id and the mask fields are what your training code uses.",
        Code::NoTrainedPositions => "The mask (loss_mask, labels != -100, or attention_mask, in that order) marks no target as\ntrained. Every loss over this data is undefined (0/0) or zero. Check the field names\n(--mask-field, --labels-field) and how the labels were built.",
        Code::EmptySupervision => include_str!("explain/empty-supervision.md"),
        Code::EosMasked => include_str!("explain/eos-masked.md"),
        Code::EosMissing => include_str!("explain/eos-missing.md"),
        Code::PadIsEos => include_str!("explain/pad-is-eos.md"),
        Code::LabelsPreShifted => include_str!("explain/labels-pre-shifted.md"),
        Code::LabelsNotShifted => include_str!("explain/labels-not-shifted.md"),
        Code::PackedBoundarySupervised => include_str!("explain/packed-boundary-supervised.md"),
        Code::MaskLabelDisagree => include_str!("explain/mask-label-disagree.md"),
        Code::PaddingTrained => include_str!("explain/padding-trained.md"),
        Code::UnexpectedNegativeLabel => include_str!("explain/unexpected-negative-label.md"),
        Code::MixedMaskSource => "Some rows carry loss_mask, others only labels or attention_mask. maskaudit takes each row's\nmask from the first field present, but a training script usually reads one field: the\nrows without it are then trained everywhere, padding included. Build every row the same way.",
    }
}
