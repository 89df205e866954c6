"""Which loss settings dpo/scratch/loss.py accepts: the loss types, the f-divergences, and the check that
refuses every combination that would be wrong or silently ignored.

`loss_settings_error` is shared by `dpo_loss` (through `check_args`, which raises) and by the
recipes' settings gate before any weights load (dpo/gate/check.py), so a setting is refused the
same way in a from-scratch script and in a recipe.
"""

from __future__ import annotations

import math

# The loss types of TRL 1.16 (DPOConfig.loss_type), plus conservative DPO ("cdpo"), which TRL dropped;
# dpo/scratch/loss.py has one function per name (LOSSES), dpo/compat.py derives TRL's list from this one.
NOT_IN_TRL = ("cdpo",)
LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", *NOT_IN_TRL,
)  # fmt: skip
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# f-DPO's reparametrisation leaves a beta log Z(x) term that cancels only in the chosen - rejected
# difference, so only losses of that difference (and sft, which ignores the reference) generalise.
F_DIVERGENCE_LOSS_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo"}
LABEL_SMOOTHING_LOSS_TYPES = {"cdpo", "robust", "exo_pair", "aot", "aot_unpaired"}  # the rest ignore it
LENGTH_LOSS_TYPES = {"ipo", "sigmoid_norm"}  # divide each sequence's score by its completion length
SORTING_LOSS_TYPES = {"aot", "aot_unpaired"}  # sort the batch, so loss i no longer belongs to pair i
DEFAULT_F_ALPHA, DEFAULT_DISCOPOP_TAU = 0.5, 0.05  # TRL's defaults for f_alpha_divergence_coef, discopop_tau


def loss_settings_error(
    loss_types,
    weights,
    beta,
    eps,
    f_divergence_type="reverse_kl",
    f_alpha=DEFAULT_F_ALPHA,
    tau=DEFAULT_DISCOPOP_TAU,
    known=LOSS_TYPES,
    use_weighting=False,
) -> str | None:
    """The first setting that is wrong or would be silently ignored, or None. `known`: the loss types
    the caller has (dpo.gate.check passes TRL's, which lack cdpo). Shared by dpo_loss and the recipes."""
    kinds = set(loss_types)
    if not loss_types:
        return "loss_type is empty; give at least one loss type."
    if unknown := [k for k in loss_types if k not in known]:
        return f"Unknown loss type(s) {unknown}; expected one of {list(known)}."
    if weights is not None and len(weights) != len(loss_types):
        return f"loss_weights has {len(weights)} entries for {len(loss_types)} loss types {list(loss_types)}."
    if not beta > 0 or not math.isfinite(beta):  # beta <= 0 reverses (or zeroes) the preference
        return f"beta must be positive; got {beta}."
    if f_divergence_type not in F_DIVERGENCES:
        return f"Unknown f_divergence_type {f_divergence_type!r}; expected one of {F_DIVERGENCES}."
    if f_divergence_type != "reverse_kl" and not kinds <= F_DIVERGENCE_LOSS_TYPES:
        return (
            f"f_divergence_type={f_divergence_type!r} applies only to losses of the chosen - rejected score "
            f"difference {sorted(F_DIVERGENCE_LOSS_TYPES & set(known))}; "
            f"{sorted(kinds - F_DIVERGENCE_LOSS_TYPES)} are not."
        )
    if f_alpha != DEFAULT_F_ALPHA and f_divergence_type != "alpha_divergence":
        return f"f_alpha_divergence_coef={f_alpha} is only used with f_divergence_type='alpha_divergence'."
    if tau != DEFAULT_DISCOPOP_TAU and "discopop" not in kinds:
        return f"discopop_tau={tau} is only used by loss_type 'discopop'."
    if "discopop" in kinds and not tau > 0:
        return f"discopop_tau must be positive; got {tau}."
    smoothing = sorted(LABEL_SMOOTHING_LOSS_TYPES & set(known))
    if eps != 0 and not kinds & LABEL_SMOOTHING_LOSS_TYPES:
        cdpo = "use 'cdpo' for conservative DPO or one of" if "cdpo" in known else "it is used only by"
        return f"label_smoothing={eps} is not used by {list(loss_types)} (TRL's 'sigmoid' ignores it); {cdpo} {smoothing}."
    if kinds & LABEL_SMOOTHING_LOSS_TYPES and not 0 <= eps < 0.5:  # eps >= 0.5 reverses the preference
        return f"label_smoothing is a label-flip probability and must lie in [0, 0.5) for {smoothing}; got {eps}."
    if "exo_pair" in kinds and eps == 0:
        return "'exo_pair' needs label_smoothing > 0 (log eps is part of the loss); EXO suggests 1e-3."
    if use_weighting and kinds & SORTING_LOSS_TYPES:
        return "WPO weights (use_weighting, pair_weights) cannot weight 'aot'/'aot_unpaired': they sort the batch."
    return None


def check_args(
    *,
    loss_types,
    weights,
    beta,
    eps,
    f_divergence_type,
    f_alpha,
    tau,
    policy_chosen,
    policy_rejected,
    reference_chosen,
    reference_rejected,
    reference_free,
    chosen_lengths,
    rejected_lengths,
    chosen_nll,
    pair_weights,
):
    """Raise ValueError for every combination that would be wrong or silently ignored (dpo_loss's
    arguments, in its order)."""
    kinds = set(loss_types)
    if problem := loss_settings_error(
        loss_types, weights, beta, eps, f_divergence_type, f_alpha, tau, use_weighting=pair_weights is not None
    ):
        raise ValueError(problem)
    if reference_free and (reference_chosen is not None or reference_rejected is not None):
        raise ValueError("reference_free=True takes the reference log-probs as 0; pass None for them.")
    if not reference_free and (reference_chosen is None or reference_rejected is None):
        raise ValueError(
            "reference_chosen_logps and reference_rejected_logps are required unless reference_free=True."
        )
    shape = policy_chosen.shape
    for name, t in [
        ("policy_rejected_logps", policy_rejected),
        ("reference_chosen_logps", reference_chosen),
        ("reference_rejected_logps", reference_rejected),
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
        ("pair_weights", pair_weights),
    ]:
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)} like policy_chosen_logps.")
    if len(shape) != 1:
        raise ValueError(f"log-probs must be (B,) per-sequence sums; got shape {tuple(shape)}.")
    if needs := sorted(kinds & LENGTH_LOSS_TYPES):
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(f"{needs} divide by completion lengths: pass chosen_lengths and rejected_lengths.")
    if "sft" in kinds and chosen_nll is None:
        raise ValueError("'sft' needs chosen_nll, the mean NLL of the chosen tokens (see sft_nll).")
    if chosen_nll is not None and "sft" not in kinds:
        raise ValueError("chosen_nll is only used by loss_type 'sft'.")
    if chosen_nll is not None and chosen_nll.dim() != 0:
        raise ValueError(f"chosen_nll must be a scalar; got shape {tuple(chosen_nll.shape)}.")
