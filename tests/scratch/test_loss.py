"""Hand-derived values for dpo/scratch/loss.py (no TRL here; tests/scratch/test_loss_agreement.py compares with TRL).

Worked example used throughout (one pair, beta = 1/2):

    log pi(y_w) = -1, log pi(y_l) = -3, log pi_ref(y_w) = log pi_ref(y_l) = -2
    u_w = log pi/pi_ref (y_w) = +1,  u_l = -1,  h = u_w - u_l = 2,  beta h = 1
    rewards (Eq. 5): beta u_w = +0.5, beta u_l = -0.5

so, writing softplus(z) = log(1 + e^z) = -log sigma(-z):
    sigmoid  -log sigma(1)                = softplus(-1)                        = 0.31326
    cdpo     0.75 softplus(-1) + 0.25 softplus(1), and softplus(1) = 1 + softplus(-1),
             so = softplus(-1) + 0.25                                           = 0.56326  (eps = 0.25)
    robust   (0.75 softplus(-1) - 0.25 softplus(1)) / 0.5 = softplus(-1) - 0.5  = -0.18674 (eps = 0.25)
    hinge    max(0, 1 - 1)                                                      = 0
    ipo      (h/1 - 1/(2 beta))^2 = (2 - 1)^2 (lengths 1)                       = 1
    sppo     (u_w - 1)^2 + (u_l + 1)^2                                          = 0
    bco      -log sigma(0.5) - log sigma(0.5) = 2 softplus(-0.5)                = 0.94815
    nca      -log sigma(.5) - .5 log sigma(-.5) - .5 log sigma(.5) = 1.5 softplus(-.5) + .5 softplus(.5) = 1.19815
    apo_zero 1 - sigma(0.5) + sigma(-0.5) = 2 sigma(-0.5)                       = 0.75508
    apo_down sigma(0.5) + 1 - sigma(1)                                          = 0.89140
    exo      KL(Bernoulli(sigma(1)) || Bernoulli(1 - eps)), which is 0 at eps = sigma(-1)
    js       s = log 2 + log sigma(u): h = log sigma(1) - log sigma(-1) = 1, loss = softplus(-0.5) = 0.47408
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpo.scratch.logps import ld_logps, sequence_logps, sft_nll, wpo_weights
from dpo.scratch.loop import reward_metrics
from dpo.scratch.loss import dpo_loss, f_divergence_scores
from dpo.scratch.loss_settings import LOSS_TYPES

TOL = dict(rtol=1e-6, atol=1e-6)  # float32 round-off on O(1) numbers


def softplus(z):
    return math.log1p(math.exp(z))


def sigma(z):
    return 1 / (1 + math.exp(-z))


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


# The worked example of the module docstring
PC, PR, RC, RR = t(-1.0), t(-3.0), t(-2.0), t(-2.0)
ONE = torch.ones(1, dtype=torch.long)

# Every loss type with the extra inputs it needs (valid options), for the generic tests below
NEEDS = {
    "exo_pair": dict(label_smoothing=1e-3),
    "robust": dict(label_smoothing=0.1),
    "cdpo": dict(label_smoothing=0.1),
    "aot": dict(label_smoothing=0.1),
    "aot_unpaired": dict(label_smoothing=0.1),
}


def extra_inputs(kind, pc):
    kw = dict(NEEDS.get(kind, {}))
    if kind in ("ipo", "sigmoid_norm"):
        n = torch.ones(pc.shape, dtype=torch.long)
        kw.update(chosen_lengths=3 * n, rejected_lengths=5 * n)
    if kind == "sft":
        kw["chosen_nll"] = -pc.mean() / 3
    return kw


def loss_of(kind, **kw):
    return dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type=kind, **kw).losses.item()


def test_worked_example():
    """The per-type values derived by hand in the module docstring."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert out.losses.item() == pytest.approx(softplus(-1), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.5) and out.rejected_rewards.item() == pytest.approx(-0.5)
    expected = {
        "cdpo": (softplus(-1) + 0.25, dict(label_smoothing=0.25)),
        "robust": (softplus(-1) - 0.5, dict(label_smoothing=0.25)),
        "hinge": (0.0, {}),
        "ipo": (1.0, dict(chosen_lengths=ONE, rejected_lengths=ONE)),
        "sppo_hard": (0.0, {}),
        "bco_pair": (2 * softplus(-0.5), {}),
        "nca_pair": (1.5 * softplus(-0.5) + 0.5 * softplus(0.5), {}),
        "apo_zero": (2 * sigma(-0.5), {}),
        "apo_down": (sigma(0.5) + 1 - sigma(1), {}),
        "exo_pair": (0.0, dict(label_smoothing=sigma(-1))),
        # one pair: sorting is the identity and both AOT margins equal h = 2
        "aot": (0.75 * softplus(-1) + 0.25 * softplus(1), dict(label_smoothing=0.25)),
        "aot_unpaired": (0.75 * softplus(-1) + 0.25 * softplus(1), dict(label_smoothing=0.25)),
        # x = beta h = 1, mixing sigma(x / 0.05) = sigma(20)
        "discopop": (softplus(-1) * sigma(-20) + math.exp(-1) * sigma(20), {}),
        # per-token scores: u_w / 2 - u_l / 4 = 0.75
        "sigmoid_norm": (softplus(-0.375), dict(chosen_lengths=2 * ONE, rejected_lengths=4 * ONE)),
        "sft": (1.25, dict(chosen_nll=torch.tensor(1.25))),
    }
    for kind, (value, kw) in expected.items():
        assert loss_of(kind, **kw) == pytest.approx(value, rel=1e-5, abs=1e-6), kind


def test_hinge_at_small_beta():
    """SLiC hinge with beta = 0.1 in the worked example: max(0, 1 - 0.1 * 2) = 0.8 (at beta = 1/2 it is 0)."""
    out = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="hinge")
    assert out.losses.item() == pytest.approx(0.8, rel=1e-6)


def test_ipo_divides_each_score_by_its_own_length():
    """IPO on per-token log-ratios: h = 1/2 - (-1)/4 = 0.75; (0.75 - 1)^2 = 1/16."""
    assert loss_of("ipo", chosen_lengths=2 * ONE, rejected_lengths=4 * ONE) == pytest.approx(1 / 16)
    # lengths are clamped at 1, as TRL does, so an empty completion does not divide by zero
    assert loss_of("ipo", chosen_lengths=0 * ONE, rejected_lengths=0 * ONE) == pytest.approx(1.0)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0, 10.0])
def test_policy_equal_to_reference_gives_ln2(beta):
    """pi = pi_ref: every log-ratio is 0, so beta h = 0 and -log sigma(0) = ln 2, whatever beta,
    and every implicit reward is 0. Likewise hinge = 1, IPO = (1/(2 beta))^2, apo_zero = 1."""
    logps = t(-12.0, -3.5, -40.0)
    other = t(-7.0, -9.0, -1.0)
    for f in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        out = dpo_loss(logps, other, logps, other, beta=beta, f_divergence_type=f)
        torch.testing.assert_close(out.losses, torch.full((3,), math.log(2)), **TOL)
        assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    n = torch.full((3,), 4)
    assert dpo_loss(logps, other, logps, other, beta=beta, loss_type="hinge").losses.tolist() == [1.0] * 3
    ipo = dpo_loss(logps, other, logps, other, beta=beta, loss_type="ipo", chosen_lengths=n, rejected_lengths=n)
    torch.testing.assert_close(ipo.losses, torch.full((3,), (1 / (2 * beta)) ** 2))
    torch.testing.assert_close(
        dpo_loss(logps, other, logps, other, beta=beta, loss_type="apo_zero").losses, torch.ones(3)
    )


def test_gradient_is_the_papers():
    """Sec. 4 of the paper: grad L = -beta sigma(r_l - r_w) [grad log pi(y_w) - grad log pi(y_l)],
    i.e. dL/d log pi(y_w) = -beta sigma(-beta h) = -0.5 sigma(-1) in the worked example."""
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    dpo_loss(pc, pr, RC, RR, beta=0.5).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5 * sigma(-1), rel=1e-6)
    assert pr.grad.item() == pytest.approx(+0.5 * sigma(-1), rel=1e-6)


def test_reference_free():
    """reference_free: pi_ref uniform, log-ratios are the policy log-probs: beta h = 0.5 (-1 + 3) = 1."""
    out = dpo_loss(PC, PR, beta=0.5, reference_free=True)
    assert out.losses.item() == pytest.approx(softplus(-1), rel=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(-0.5) and out.rejected_rewards.item() == pytest.approx(-1.5)
    # ... which is DPO against a reference that gives both completions the same log-prob
    same = dpo_loss(PC, PR, t(-5.0), t(-5.0), beta=0.5).losses
    torch.testing.assert_close(out.losses, same)


def test_cdpo_and_robust_reduce_to_dpo_at_zero_smoothing():
    pc, pr, rc, rr = t(-1.0, -8.0, -3.0), t(-2.0, -4.0, -3.5), t(-1.5, -6.0, -3.0), t(-1.0, -5.0, -4.0)
    dpo = dpo_loss(pc, pr, rc, rr).losses
    for kind in ("cdpo", "robust"):
        torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, loss_type=kind).losses, dpo)


def test_f_divergence_scores_by_hand():
    """f'(t) at u = log t = 1 and -1 (worked example): forward KL 1 - e^-u; JS log 2 + log sigma(u);
    alpha 1/2: (e^(-u/2) - 1) / (-1/2). Then the sigmoid loss of beta (s_w - s_l)."""
    u = t(1.0, -1.0)
    torch.testing.assert_close(f_divergence_scores(u, "forward_kl"), t(1 - math.exp(-1), 1 - math.e))
    torch.testing.assert_close(
        f_divergence_scores(u, "js_divergence"), t(math.log(2 * sigma(1)), math.log(2 * sigma(-1)))
    )
    torch.testing.assert_close(
        f_divergence_scores(u, "alpha_divergence", 0.5), t(2 * (1 - math.exp(-0.5)), 2 * (1 - math.exp(0.5)))
    )
    torch.testing.assert_close(
        f_divergence_scores(u, "alpha_divergence", 1.0), u
    )  # the alpha -> 1 limit is reverse KL
    # JS: log sigma(1) - log sigma(-1) = 1, so beta h = 0.5
    assert loss_of("sigmoid", f_divergence_type="js_divergence") == pytest.approx(softplus(-0.5), rel=1e-6)
    # forward KL: h = e - 1/e = 2 sinh(1)
    assert loss_of("sigmoid", f_divergence_type="forward_kl") == pytest.approx(softplus(-math.sinh(1)), rel=1e-6)
    # alpha: exponent (alpha - 1) u is clamped at 80, so a huge negative log-ratio stays finite
    assert f_divergence_scores(t(-1000.0), "alpha_divergence", 0.5).item() == pytest.approx(
        2 * (1 - math.exp(80)), rel=1e-6
    )


def test_aot_sorts_the_batch():
    """Two pairs, beta 1, eps 0. log pi(y_w) = (0, -1), log pi(y_l) = (0, -3), reference (0, 0) and (-2, 0).
    AOT: policy margins (0, 2) and reference margins (2, 0), each sorted: (0, 2) - (0, 2) = (0, 0),
    so the loss is ln 2 per pair (unsorted it would be softplus(2) + softplus(-2)).
    AOT unpaired: u_w = (0, -1), u_l = (2, -3); sorted (-1, 0) - (-3, 2) = (2, -2): softplus(-2) + softplus(2)
    = 2 + 2 softplus(-2) (unsorted (-2, 2), the same by symmetry, so check the per-position values)."""
    pc, pr, rc, rr = t(0.0, -1.0), t(0.0, -3.0), t(0.0, 0.0), t(-2.0, 0.0)
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot")
    torch.testing.assert_close(out.losses, t(math.log(2), math.log(2)))
    out = dpo_loss(pc, pr, rc, rr, beta=1.0, loss_type="aot_unpaired")
    torch.testing.assert_close(out.losses, t(softplus(-2), softplus(2)))


def test_loss_weights_combine_per_pair_means():
    """loss_type list: losses.mean() = sum_i w_i mean(loss_i), as TRL's weighted sum."""
    pc, pr, rc, rr = t(-1.0, -8.0, -3.0), t(-2.0, -4.0, -3.5), t(-1.5, -6.0, -3.0), t(-1.0, -5.0, -4.0)
    nll = torch.tensor(2.5)
    parts = {
        "sigmoid": dpo_loss(pc, pr, rc, rr).losses.mean(),
        "bco_pair": dpo_loss(pc, pr, rc, rr, loss_type="bco_pair").losses.mean(),
        "sft": nll,
    }
    combined = dpo_loss(pc, pr, rc, rr, loss_type=list(parts), loss_weights=[0.8, 0.2, 1.0], chosen_nll=nll)
    expected = 0.8 * parts["sigmoid"] + 0.2 * parts["bco_pair"] + 1.0 * parts["sft"]
    assert combined.losses.mean().item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = dpo_loss(pc, pr, rc, rr, loss_type=["sigmoid", "bco_pair"]).losses.mean()
    assert unweighted.item() == pytest.approx((parts["sigmoid"] + parts["bco_pair"]).item(), rel=1e-6)


def test_pair_weights_scale_each_pair():
    pc, pr, rc, rr = t(-1.0, -8.0), t(-2.0, -4.0), t(-1.5, -6.0), t(-1.0, -5.0)
    w = t(0.5, 2.0)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, pair_weights=w).losses, dpo_loss(pc, pr, rc, rr).losses * w)


def test_sequence_logps_shift_and_mask():
    """Vocabulary of 4, one row [p, c1, c2, pad] with the prompt token p and pad masked (-100).
    Position 0 predicts c1 and position 1 predicts c2; we make position 0 put logit ln 3 on c1
    (p(c1) = 3/6 = 1/2 against three logits 0) and position 1 uniform (p(c2) = 1/4); the last position
    predicts nothing. So log pi(y|x) = ln(1/2) + ln(1/4) = -ln 8 over 2 tokens."""
    c1, c2 = 2, 3
    logits = torch.zeros(1, 4, 4)
    logits[0, 0, c1] = math.log(3)
    logits[0, 2, :] = 100.0  # predicts the padding position: must not count
    labels = torch.tensor([[-100, c1, c2, -100]])
    out = sequence_logps(logits, labels, with_log_sum_sq_probs=True)
    assert out.logps.item() == pytest.approx(-math.log(8), rel=1e-6)
    assert out.lengths.tolist() == [2]
    assert out.mask.tolist() == [[True, True, False]]
    torch.testing.assert_close(out.token_logps, t(math.log(0.5), math.log(0.25), 0.0)[None])
    # WPO normaliser log sum_v p_v^2: (1/2)^2 + 3 (1/6)^2 = 1/3 at position 0, 4 (1/4)^2 = 1/4 at position 1
    torch.testing.assert_close(out.log_sum_sq_probs, t(math.log(1 / 3), math.log(1 / 4), 0.0)[None])
    # WPO weight: exp(mean(log p_y - log sum p^2)) = exp((ln(3/2) + ln 1) / 2) = sqrt(3/2)
    w = wpo_weights(out.token_logps, out.log_sum_sq_probs, out.mask)
    assert w.item() == pytest.approx(math.sqrt(1.5), rel=1e-6)
    assert sft_nll(out.token_logps, out.mask).item() == pytest.approx(math.log(8) / 2, rel=1e-6)


def test_ld_logps_by_hand():
    """Chosen has 2 completion tokens, rejected 4: the shared length is 2, so the rejected tail is
    its last 2 tokens, weighted by alpha = 0.5: -1 - 2 + 0.5 (-3 - 4) = -6.5. Chosen is unchanged."""
    chosen_tok, chosen_mask = t(0.0, -1.0, -2.0, 0.0, 0.0)[None], torch.tensor([[0, 1, 1, 0, 0]]).bool()
    rejected_tok, rejected_mask = t(-1.0, -2.0, -3.0, -4.0, 0.0)[None], torch.tensor([[1, 1, 1, 1, 0]]).bool()
    c, r = ld_logps(chosen_tok, chosen_mask, rejected_tok, rejected_mask, 0.5)
    assert c.item() == -3.0 and r.item() == -6.5
    c, r = ld_logps(chosen_tok, chosen_mask, rejected_tok, rejected_mask, 1.0)  # alpha 1: plain sums
    assert c.item() == -3.0 and r.item() == -10.0
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_logps(chosen_tok, chosen_mask, rejected_tok, rejected_mask, 1.5)


def test_reward_metrics_by_hand():
    chosen, rejected = t(0.5, -1.0, 2.0, 0.0), t(-0.5, -0.5, 1.0, 0.0)
    m = reward_metrics(chosen, rejected, t(-10.0, -20.0, -30.0, -40.0), t(-1.0, -2.0, -3.0, -6.0))
    assert m == pytest.approx({
        "rewards/chosen": 0.375, "rewards/rejected": 0.0,
        "rewards/accuracies": 0.5,  # 0.5 > -0.5 and 2 > 1; -1 < -0.5; a tie is not a win
        "rewards/margins": 0.375, "logps/chosen": -25.0, "logps/rejected": -3.0,
    })  # fmt: skip


@pytest.mark.parametrize("kind", LOSS_TYPES)
def test_extreme_logps_stay_finite(kind):
    """Log-probs of magnitude ~1e3 (long or very unlikely completions) give finite losses and
    gradients wherever the math is finite: |beta h| ~ 1e3 saturates sigmoids, it must not overflow.
    Excluded because the true value exceeds float32 (3.4e38): forward KL, whose score 1 - exp(-u) is
    ~e^1000 there, and IPO under the alpha-divergence, whose clamped score ~e^80 is squared."""
    pc = t(-1000.0, -1.0, -2000.0, -5.0).requires_grad_()
    pr = t(-1.0, -1000.0, -5.0, -2000.0).requires_grad_()
    rc, rr = t(-3.0, -900.0, -1.0, -1500.0), t(-1200.0, -2.0, -1800.0, -3.0)
    for f in ("reverse_kl", "js_divergence", "alpha_divergence"):
        if f != "reverse_kl" and kind not in {"sigmoid", "hinge", "ipo", "robust", "discopop", "cdpo"}:
            continue
        if f == "alpha_divergence" and kind == "ipo":
            continue
        for beta in (0.1, 1.0):
            pc.grad = pr.grad = None
            kw = extra_inputs(kind, pc)
            out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=kind, f_divergence_type=f, **kw)
            out.losses.sum().backward()
            assert torch.isfinite(out.losses).all(), (f, beta, out.losses)
            assert torch.isfinite(pc.grad).all(), (f, beta)
            assert pr.grad is None if kind == "sft" else torch.isfinite(pr.grad).all(), (f, beta)


def test_discopop_is_finite_where_trl_overflows():
    """beta h = -200: exp(-x) = e^200 overflows float32, but it is multiplied by sigma(x/tau) =
    sigma(-4000) ~ e^-4000; the product is ~0 and the loss is the logistic part, softplus(200) = 200."""
    out = dpo_loss(t(-2000.0), t(0.0), t(0.0), t(0.0), beta=0.1, loss_type="discopop")
    assert out.losses.item() == pytest.approx(200.0, rel=1e-6)


def test_sequence_logps_extreme_logits_finite():
    logits = torch.tensor([[[1e4, -1e4, 0.0], [-1e4, 1e4, 0.0], [0.0, 0.0, 0.0]]])
    out = sequence_logps(logits, torch.tensor([[-100, 1, 0]]), with_log_sum_sq_probs=True)
    # each scored token is 2e4 below the top logit: log p = -2e4, twice
    assert torch.isfinite(out.logps).all() and out.logps.item() == pytest.approx(-4e4, rel=1e-6)
    assert torch.isfinite(out.log_sum_sq_probs).all()


def test_half_precision_logits_are_upcast():
    logits = torch.randn(2, 6, 50, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(1))
    labels[:, :2] = -100
    full = sequence_logps(logits, labels).logps
    half = sequence_logps(logits.bfloat16(), labels).logps
    assert half.dtype == torch.float32
    ref = F.log_softmax(logits.bfloat16().float()[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[
        ..., 0
    ]
    torch.testing.assert_close(half, (ref * (labels[:, 1:] != -100)).sum(-1))
    torch.testing.assert_close(full, half, rtol=0, atol=0.1)


# ---------------------------------------------------------------------------------------------
# Invalid combinations raise, naming the problem


x = t(-1.0, -2.0)
N = torch.tensor([2, 3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(loss_type="dpo"), "Unknown loss type"),
        (dict(loss_type=[]), "empty"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights has 1 entries for 2"),
        (dict(loss_type="sigmoid", loss_weights=[1.0, 2.0]), "loss_weights"),
        (dict(beta=0.0), "beta"),
        (dict(f_divergence_type="kl"), "Unknown f_divergence_type"),
        (dict(f_divergence_type="forward_kl", loss_type="bco_pair"), "bco_pair"),
        (dict(f_divergence_type="js_divergence", loss_type="aot"), "aot"),
        (dict(f_alpha_divergence_coef=0.3), "alpha_divergence"),
        (dict(discopop_tau=0.1), "discopop"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau"),
        (dict(label_smoothing=0.1), "label_smoothing"),  # sigmoid would ignore it
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), r"\[0, 0.5\)"),
        (dict(loss_type="cdpo", label_smoothing=0.7), r"\[0, 0.5\)"),
        (dict(loss_type="aot", label_smoothing=-0.1), r"\[0, 0.5\)"),
        (dict(loss_type="exo_pair"), "exo_pair"),
        (dict(loss_type="ipo"), "lengths"),
        (dict(loss_type="sigmoid_norm", chosen_lengths=N), "lengths"),
        (dict(loss_type="sft"), "chosen_nll"),
        (dict(chosen_nll=torch.tensor(1.0)), "sft"),
        (dict(loss_type="sft", chosen_nll=t(1.0, 2.0)), "scalar"),
        (dict(loss_type="aot", pair_weights=t(1.0, 1.0)), "pair_weights"),
        (dict(pair_weights=t(1.0, 1.0, 1.0)), "pair_weights has shape"),
        (dict(reference_free=True), "reference_free"),
    ],
)
def test_invalid_combinations_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)


def test_missing_reference_raises():
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(x, x)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(x, x, x, t(-1.0))
