#!/usr/bin/env python3
"""trl's own GRPO and DPO losses as `--loss` files (run by `make hf-models`, read by
tests/rl_trl.rs).

    rl_trl.py [--out DIR]        (default target/hf-models/rl-trl)

fixtures/generate_rl.py re-types the published formulas; this script does not. Each
DIR/grpo_<loss_type>.pt is a torch.jit.trace of `GRPOTrainer._compute_loss`, trl's own method,
bound to a stand-in trainer whose attributes come from a real `GRPOConfig` (beta 0, one
process, no accumulation) and whose per-token-log-prob helper returns the traced `logprobs`
input. Its forward takes maskaudit's `logprobs, old_logprobs, advantages, response_mask[,
num_items_in_batch]` and hands them to trl as `old_per_token_logps`, `advantages`,
`completion_mask` and `num_items_in_batch`. DIR/dpo_<loss_type>.pt is `DPOTrainer._compute_loss`
the same way, over a stand-in model whose fused-LM-head output is the traced log-probs, zero
where the label is -100 (the contract trl documents for `add_fused_lm_head`); trl builds those
labels from the completion mask, sums each row, and applies its loss.

Each file is checked here against a direct call of trl's method on random inputs of two
shapes other than the traced one: the loss and its gradient with respect to the log-probs
within 1e-6. A file that does not trace faithfully (a `torch.no_grad` region, which tracing
drops, in the gradient's path) is left out and listed in expected.json's `untraceable`.

DIR/rollouts.jsonl and DIR/pairs.jsonl are rows for fixtures/tiny_lm.pt (vocab 48); the
rollouts' `old_logprobs` are finite at every position, as trl computes them with the model
over the whole padded completion. DIR/expected.json holds the classification read from trl's
code (each with the normaliser line it comes from), independent of maskaudit, and the
probe weights trl's code gives, checked against that reading.

Skipped when DIR/.stamp matches this script and the library versions.
"""

import hashlib
import json
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
VOCAB = 48  # fixtures/tiny_lm.pt
BATCH = 4
MAX_COMPLETION = 16  # GRPOConfig.max_completion_length: dr_grpo's constant is BATCH × this
SEED = 2024

# loss_type -> (importance_sampling_level, takes num_items_in_batch, aggregation, constant,
# why). Read from GRPOTrainer._compute_loss in trl 1.16 (the loss at ratio 1, beta 0).
GRPO = {
    "grpo": ("token", False, "seq_mean_token_mean", None,
             "((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()"),
    "bnpo": ("token", False, "token_mean", None,
             "(per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)"),
    "dr_grpo": ("token", False, "seq_mean_token_sum_norm", float(BATCH * MAX_COMPLETION),
                "(per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)"),
    "dapo": ("token", True, "token_mean", None,
             "(per_token_loss * mask).sum() / num_items_in_batch (one process, no accumulation)"),
    # The clipped ratio is detached and multiplies the log-prob: at ratio 1 each token weighs
    # min(1, epsilon_high) × 1/N, a token mean at that scale (trl's default epsilon_high 0.2).
    "cispo": ("token", True, "token_mean", None,
              "-clamp(coef_1, max=epsilon_high).detach() * advantages * per_token_logps, / num_items_in_batch"),
    # d/dlogp of sigmoid(tau (r - 1)) * 4 / tau is 1 at r = 1; the grpo normaliser.
    "sapo": ("token", False, "seq_mean_token_mean", None,
             "sigmoid(tau (coef_1 - 1)) * 4 / tau, then the grpo normaliser"),
    # GSPO: one (B,1) ratio of the mean log-ratio, then the grpo normaliser: 1/(B L_b) per token.
    "gspo": ("sequence", False, "seq_mean_token_mean", None,
             "importance_sampling_level='sequence' (mean log-ratio per row) with loss_type='grpo'"),
    # The (B,1) sequence ratio's gradient is 1/L_b per token, times L_b from the sum: 1/B.
    "luspo": ("sequence", False, "seq_mean_token_sum", None,
              "(per_token_loss * mask).sum(-1).mean() over a (B,1) sequence-level ratio"),
    "vespo": ("token", True, "token_mean", None,
              "-phi_seq * advantages * per_token_logps (phi detached, 1 at w = 1), / num_items_in_batch"),
}
# loss_type -> how trl reduces each completion's log-probs before the loss.
DPO = {
    "sigmoid": ("sum", "logps = per_token_logps.sum(dim=1); -logsigmoid(beta * delta_score)"),
    "ipo": ("mean", "chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0), squared against 1/(2 beta)"),
    "sigmoid_norm": ("mean", "chosen_scores / chosen_mask.sum(dim=1).clamp(min=1.0) inside -logsigmoid"),
}


def stamp_text() -> str:
    from importlib.metadata import version

    h = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    libs = " ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "trl"))
    return f"{h} {libs}\n"


def metrics_accelerator():
    """What `_compute_loss`'s metric logging calls on the accelerator, for one process."""
    import torch

    return types.SimpleNamespace(
        num_processes=1, device=torch.device("cpu"), sync_gradients=True,
        gather=lambda x: x, gather_for_metrics=lambda x: x, reduce=lambda x, reduction="sum": x)


def grpo_trainer(loss_type: str):
    """An object carrying what GRPOTrainer._compute_loss reads, set from a real GRPOConfig as
    GRPOTrainer.__init__ sets it."""
    import torch
    from trl import GRPOConfig

    level = GRPO[loss_type][0]
    trl_type = "grpo" if loss_type == "gspo" else loss_type
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(output_dir=tmp, loss_type=trl_type, beta=0.0, report_to=[],
                          importance_sampling_level=level, max_completion_length=MAX_COMPLETION,
                          use_cpu=True)
    from trl import GRPOTrainer

    t = types.SimpleNamespace()
    # trl's static helpers, called through self.
    t.get_gamma_weights = GRPOTrainer.get_gamma_weights
    t.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    t.args = args
    t.loss_type = args.loss_type
    t.beta = args.beta
    t.epsilon_low = args.epsilon
    t.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    t.importance_sampling_level = args.importance_sampling_level
    t.max_completion_length = args.max_completion_length
    t.off_policy_mask_threshold = args.off_policy_mask_threshold
    t.top_entropy_quantile = args.top_entropy_quantile
    t.use_vllm = False
    t.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    t.entropy_coef = args.entropy_coef
    t.use_adaptive_entropy = args.use_adaptive_entropy
    t._entropy_bonus_enabled = t.entropy_coef != 0.0 or t.use_adaptive_entropy
    t.aux_loss_enabled = False
    t.current_gradient_accumulation_steps = 1
    t.model = torch.nn.Module().train()
    t.accelerator = metrics_accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    return t


class TrlGrpoLoss:
    """forward(logprobs, old_logprobs, advantages, response_mask[, num_items_in_batch]) through
    GRPOTrainer._compute_loss."""

    def __init__(self, loss_type: str):
        from trl import GRPOTrainer

        self.trainer = grpo_trainer(loss_type)
        self.compute = GRPOTrainer._compute_loss
        self.current = None
        # The model's log-probs are maskaudit's input; entropies feed only the logged metrics.
        self.trainer._get_per_token_logps_and_entropies = (
            lambda model, input_ids, attention_mask, logits_to_keep, **kw:
            (self.current, self.current.detach() * 0, None))

    def __call__(self, logprobs, old, advantages, mask, num_items=None):
        import torch

        self.current = logprobs
        b, t = logprobs.shape
        inputs = {
            "prompt_ids": torch.zeros(b, 0, dtype=torch.long),
            "prompt_mask": torch.zeros(b, 0, dtype=torch.long),
            "completion_ids": torch.zeros(b, t, dtype=torch.long),
            "completion_mask": mask,
            "advantages": advantages,
            "old_per_token_logps": old,
        }
        if num_items is not None:
            inputs["num_items_in_batch"] = num_items
        return self.compute(self.trainer, None, inputs)


class FusedHeadStandIn:
    """A model with trl's fused LM head: `log_probs` of each next token, zero where the label
    is -100 (trl.trainer.utils.add_fused_lm_head's documented output); the values are the ones
    maskaudit passes in."""

    def __init__(self):
        self.current = None
        self.training = True
        self.is_gradient_checkpointing = False

    def __call__(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        import torch

        keep = labels[:, 1:] != -100
        lp = self.current.masked_fill(~keep, 0.0)
        zeros = torch.zeros_like(lp).detach()
        return types.SimpleNamespace(log_probs=lp, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros_like(keep), log_sum_sq_probs=zeros, aux_loss=None)


def dpo_trainer(loss_type: str):
    from trl import DPOConfig

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, loss_type=[loss_type], report_to=[], use_cpu=True)
    t = types.SimpleNamespace()
    t.args = args
    t.beta = args.beta
    t.precompute_ref_logps = False
    t.loss_types = args.loss_type
    t.loss_weights = args.loss_weights or [1.0] * len(t.loss_types)
    t.ld_alpha = args.ld_alpha
    t.f_divergence_type = args.f_divergence_type
    t.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    t.use_weighting = args.use_weighting
    t.label_smoothing = args.label_smoothing
    t.aux_loss_enabled = False
    t._total_train_tokens = 0
    t._tp_size = 1
    t.accelerator = metrics_accelerator()
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.model = FusedHeadStandIn()
    t.ref_model = FusedHeadStandIn()
    return t


class TrlDpoLoss:
    """forward(chosen_logprobs, rejected_logprobs, chosen_mask, rejected_mask,
    ref_chosen_logprobs, ref_rejected_logprobs) through DPOTrainer._compute_loss. maskaudit's
    tensors are [B, T-1], aligned with the next-token targets; trl's batch is chosen rows then
    rejected rows, [2B, T], its completion mask over the tokens themselves."""

    def __init__(self, loss_type: str):
        from trl import DPOTrainer

        self.trainer = dpo_trainer(loss_type)
        self.compute = DPOTrainer._compute_loss

    def __call__(self, c, r, cm, rm, rc, rr):
        import torch

        self.trainer.model.current = torch.cat([c, r])
        self.trainer.ref_model.current = torch.cat([rc, rr])
        shifted = torch.cat([cm, rm]).long()
        completion_mask = torch.cat([torch.zeros_like(shifted[:, :1]), shifted], dim=1)
        inputs = {
            "input_ids": torch.zeros_like(completion_mask),
            "attention_mask": torch.ones_like(completion_mask),
            "completion_mask": completion_mask,
        }
        return self.compute(self.trainer, self.trainer.model, inputs, False)


def as_module(fn):
    import torch

    class Wrapped(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    return Wrapped().eval()


def policy_inputs(gen, b: int, t: int, count: bool):
    import torch

    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths.tolist()):
        start = int(torch.randint(0, t - n + 1, (1,), generator=gen))
        mask[i, start:start + n] = 1.0
    lp = -torch.rand(b, t, generator=gen) * 3 - 0.1
    old = lp + 0.3 * torch.randn(b, t, generator=gen)
    adv = torch.randn(b, 1, generator=gen)
    args = [lp, old, adv, mask]
    if count:
        args.append(mask.sum().long())
    return args


def preference_inputs(gen, b: int, t: int):
    import torch

    def side():
        mask = torch.zeros(b, t)
        for i in range(b):
            p = int(torch.randint(1, t // 2 + 1, (1,), generator=gen))
            n = int(torch.randint(1, t - p + 1, (1,), generator=gen))
            mask[i, p - 1:p - 1 + n] = 1.0
        return mask

    cm, rm = side(), side()
    draw = lambda: -torch.rand(b, t, generator=gen) * 3 - 0.1  # noqa: E731
    return [draw(), draw(), cm, rm, draw(), draw()]


def value_and_grad(fn, args, leaves):
    import torch

    args = [a.clone() for a in args]
    for i in leaves:
        args[i].requires_grad_(True)
    loss = fn(*args)
    grads = torch.autograd.grad(loss, [args[i] for i in leaves], allow_unused=True)
    grads = [torch.zeros_like(args[i]) if g is None else g for i, g in zip(leaves, grads)]
    return loss.detach(), grads


def faithful(traced, direct, make, leaves, gen) -> str:
    """'' when the traced file equals trl's direct call (value and gradient, 1e-6) on two
    shapes other than the traced one; else what differs."""
    import torch

    for b, t in ((3, 7), (5, 11)):
        args = make(gen, b, t)
        v1, g1 = value_and_grad(traced, args, leaves)
        v2, g2 = value_and_grad(direct, args, leaves)
        if not torch.allclose(v1, v2, rtol=1e-6, atol=1e-7):
            return f"value {float(v1)} against trl's {float(v2)} at B={b}, T={t}"
        for a, bb in zip(g1, g2):
            if not torch.allclose(a, bb, rtol=1e-6, atol=1e-7):
                return f"gradient off by {float((a - bb).abs().max())} at B={b}, T={t}"
    return ""


def probe_weights(fn, mask, count: bool):
    """−∂loss/∂logprobs at maskaudit's probe: advantages 1, old log-probs = current."""
    import torch

    lp = (-torch.rand(mask.shape) * 3 - 0.1).requires_grad_(True)
    args = [lp, lp.detach().clone(), torch.ones(mask.shape[0], 1), mask]
    if count:
        args.append(mask.sum().long())
    (g,) = torch.autograd.grad(fn(*args), [lp])
    return -g


def by_hand(aggregation: str, mask, constant):
    """Each aggregation's per-token weight, as docs/guide.md defines it."""
    import torch

    b = mask.shape[0]
    lengths = mask.sum(-1, keepdim=True).clamp(min=1)
    per = {
        "token_mean": torch.full_like(mask, 1.0) / mask.sum(),
        "seq_mean_token_mean": (1.0 / (b * lengths)).expand_as(mask),
        "seq_mean_token_sum": torch.full_like(mask, 1.0 / b),
        "seq_mean_token_sum_norm": torch.full_like(mask, 1.0 / (constant or 1.0)),
    }[aggregation]
    return per * mask


# ------------------------------------------------------------------------------------------
# Data for fixtures/tiny_lm.pt
# ------------------------------------------------------------------------------------------


def rollouts(gen, n: int):
    import torch

    rows = []
    for _ in range(n):
        prompt = 2 + int(torch.randint(0, 3, (1,), generator=gen))
        response = 1 + int(torch.randint(0, 9, (1,), generator=gen))
        mask = [0] * prompt + [1] * response
        ids = torch.randint(3, VOCAB, (len(mask),), generator=gen).tolist()
        old = [round(-0.5 - 3.0 * float(torch.rand(1, generator=gen)), 4) for _ in mask]
        rows.append({"input_ids": ids, "response_mask": mask,
                     "advantages": round(float(torch.randn(1, generator=gen)), 4),
                     "old_logprobs": old})
    return rows


def pairs(gen, n: int):
    import torch

    draw = lambda k: torch.randint(3, VOCAB, (k,), generator=gen).tolist()  # noqa: E731
    out = []
    for _ in range(n):
        p, c, r = (1 + int(torch.randint(1, 4, (1,), generator=gen)),
                   1 + int(torch.randint(0, 7, (1,), generator=gen)),
                   1 + int(torch.randint(0, 7, (1,), generator=gen)))
        out.append({"prompt_ids": draw(p), "chosen_ids": draw(c), "rejected_ids": draw(r)})
    return out


def batch_masks(rows):
    """The [B, T-1] response masks maskaudit builds from the rollouts, `--batch-size` BATCH."""
    import torch

    for i in range(0, len(rows), BATCH):
        chunk = rows[i:i + BATCH]
        width = max(len(r["input_ids"]) for r in chunk)
        mask = torch.zeros(len(chunk), width - 1)
        for b, r in enumerate(chunk):
            m = torch.tensor(r["response_mask"][1:], dtype=torch.float32)
            mask[b, :m.numel()] = m
        yield mask


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


def build(out: Path) -> dict:
    """Long because each case traces, verifies and checks its weights in turn."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    rows = rollouts(gen, 12)
    masks = list(batch_masks(rows))
    assert any(len(set(m.sum(-1).tolist())) > 1 for m in masks), "response lengths must vary"
    assert max(sum(r["response_mask"]) for r in rows) <= MAX_COMPLETION
    write_jsonl(out / "rollouts.jsonl", rows)
    write_jsonl(out / "pairs.jsonl", pairs(gen, 8))
    expected = {"policy": {}, "preference": {}, "untraceable": {}}
    for name, (_, count, aggregation, constant, why) in GRPO.items():
        direct = TrlGrpoLoss(name)
        example = policy_inputs(gen, BATCH, 9, count)
        traced = torch.jit.trace(as_module(TrlGrpoLoss(name)), tuple(example),
                                 check_trace=False)
        differs = faithful(traced, direct, lambda g, b, t: policy_inputs(g, b, t, count), [0], gen)
        if differs:
            expected["untraceable"][f"grpo_{name}"] = differs
            continue
        # A token mean at a fixed multiple is still one (maskaudit reports it as `scale`).
        scale = min(1.0, direct.trainer.epsilon_high) if name == "cispo" else 1.0
        for mask in masks:
            w = probe_weights(direct, mask, count)
            hand = by_hand(aggregation, mask, constant) * scale
            assert torch.allclose(w, hand, rtol=1e-6, atol=1e-9), (name, w, hand)
        torch.jit.save(traced, str(out / f"grpo_{name}.pt"))
        expected["policy"][f"grpo_{name}"] = {
            "loss_type": "grpo" if name == "gspo" else name,
            "importance_sampling_level": GRPO[name][0],
            "takes_count": count,
            "aggregation": aggregation,
            "constant": constant,
            "scale": scale,
            "from": why,
        }
    for name, (statistic, why) in DPO.items():
        direct = TrlDpoLoss(name)
        example = preference_inputs(gen, 3, 9)
        traced = torch.jit.trace(as_module(TrlDpoLoss(name)), tuple(example), check_trace=False)
        differs = faithful(traced, direct, preference_inputs, [0, 1], gen)
        if differs:
            expected["untraceable"][f"dpo_{name}"] = differs
            continue
        torch.jit.save(traced, str(out / f"dpo_{name}.pt"))
        expected["preference"][f"dpo_{name}"] = {"loss_type": name, "preference_logps": statistic,
                                                 "from": why}
    return expected


def main(argv) -> int:
    out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else (
        ROOT / "target" / "hf-models" / "rl-trl")
    stamp = out / ".stamp"
    if stamp.is_file() and stamp.read_text() == stamp_text():
        print(f"trl RL losses up to date in {out}")
        return 0
    import logging
    import warnings

    import torch

    # As maskaudit runs TorchScript (model::configure_libtorch): the profiling executor's
    # optimised graph gives min() no gradient at a tie, which a clip loss at ratio 1 is.
    torch._C._jit_set_profiling_mode(False)
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    logging.getLogger("trl").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    expected = build(out)
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"trl RL losses written to {out}: {', '.join([*expected['policy'], *expected['preference']])}"
          + (f"; untraceable: {expected['untraceable']}" if expected["untraceable"] else ""))
    stamp.write_text(stamp_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
