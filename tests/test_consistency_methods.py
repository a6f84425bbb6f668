"""The consistency methods (pipeline/consistency/) on hand-made tensors, against numbers worked
out by hand from the papers' formulas (in the comments). Logits are log(chosen probabilities),
so softmax gives those probabilities back. No Lightning; fast."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from pipeline.consistency import (
    METHODS,
    ConsistencySpec,
    Debias,
    DistAlign,
    FixMatch,
    FlexMatch,
    FreeMatch,
    SoftMatch,
    Sync,
    build,
)
from pipeline.consistency.freematch import fairness_loss

LN2 = math.log(2.0)


def logits(*rows: list[float]) -> torch.Tensor:
    """Logits whose softmax is each row (rows sum to 1)."""
    return torch.tensor(rows, dtype=torch.float32).log()


def method(name: str, num_classes: int = 3, pool: int = 10, **spec: object):
    built = build(ConsistencySpec(method=name, **spec), num_classes, pool)
    assert built is not None
    return built.train()


# ----------------------------------------------------------------------------------- build


def test_build_none_unknown_and_bad_settings():
    assert METHODS == ("none", "fixmatch", "flexmatch", "freematch", "softmatch")
    assert build(ConsistencySpec(), 10, 100) is None
    kinds = {name: type(build(ConsistencySpec(method=name), 10, 100)) for name in METHODS[1:]}
    assert kinds == {
        "fixmatch": FixMatch,
        "flexmatch": FlexMatch,
        "freematch": FreeMatch,
        "softmatch": SoftMatch,
    }
    with pytest.raises(ValueError, match="use one of none, fixmatch, flexmatch, freematch"):
        build(ConsistencySpec(method="mixmatch"), 10, 100)
    with pytest.raises(ValueError, match="mapping must be one of convex, linear"):
        build(ConsistencySpec(method="flexmatch", mapping="concave"), 10, 100)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        build(ConsistencySpec(method="fixmatch", temperature=0.0), 10, 100)
    with pytest.raises(ValueError, match="ema_momentum must be in"):
        build(ConsistencySpec(method="softmatch", ema_momentum=1.0), 10, 100)
    with pytest.raises(ValueError, match=r"debias must be >= 0 \(0: off\)"):
        build(ConsistencySpec(method="fixmatch", debias=-0.4), 10, 100)


# -------------------------------------------------------------------------------- FixMatch


def test_fixmatch_mask_and_loss_by_hand():
    fix = method("fixmatch", threshold=0.95)
    weak = logits(
        [0.96, 0.02, 0.02],  # max 0.96 >= 0.95: kept, label 0
        [0.50, 0.30, 0.20],  # 0.50: dropped (label 0)
        [0.02, 0.97, 0.01],  # 0.97: kept, label 1
        [0.10, 0.10, 0.80],  # 0.80: dropped (label 2)
    ).requires_grad_()
    strong = logits(
        [0.50, 0.25, 0.25],  # CE vs label 0: -ln 0.5 = ln 2
        [0.10, 0.10, 0.80],  # masked out
        [0.25, 0.25, 0.50],  # CE vs label 1: -ln 0.25 = 2 ln 2
        [0.10, 0.10, 0.80],  # masked out
    ).requires_grad_()
    out = fix(weak, strong, torch.arange(4))
    assert out.mask.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert out.pseudo_label.tolist() == [0, 0, 1, 2]
    # mean over the batch of 4, not over the 2 kept: (ln 2 + 2 ln 2) / 4 = 0.519860
    assert out.loss.item() == pytest.approx(3 * LN2 / 4, abs=1e-6)
    assert fix.class_thresholds().tolist() == pytest.approx([0.95] * 3)
    out.loss.backward()
    assert weak.grad is None and strong.grad is not None  # the weak view is detached
    assert strong.grad[1].abs().sum() == 0  # a masked sample gets no gradient


def test_soft_targets_with_temperature():
    fix = method("fixmatch", threshold=0.5, temperature=0.5)
    # softmax(log p / 0.5) = p^2 / sum p^2: [.36, .04, .04] / .44 = [9/11, 1/11, 1/11]
    weak = logits([0.6, 0.2, 0.2], [0.2, 0.2, 0.6])
    strong = logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    out = fix(weak, strong, torch.arange(2))
    # sample 0: -(9/11 ln .5 + 2/11 ln .25) = (9 + 4)/11 ln 2 = 13/11 ln 2
    # sample 1: -(1/11 ln .5 + 10/11 ln .25) = (1 + 20)/11 ln 2 = 21/11 ln 2
    # mean: 34/22 ln 2 = 17/11 ln 2 = 1.071228
    assert out.loss.item() == pytest.approx(17 / 11 * LN2, abs=1e-6)
    assert out.mask.tolist() == [1.0, 1.0] and out.pseudo_label.tolist() == [0, 2]


def test_half_precision_logits_give_a_float32_loss():
    fix = method("fixmatch", threshold=0.9)
    weak = logits([0.96, 0.02, 0.02]).bfloat16()
    strong = logits([0.5, 0.25, 0.25]).bfloat16()
    out = fix(weak, strong, torch.arange(1))
    assert out.loss.dtype == torch.float32 and out.mask.dtype == torch.float32
    assert out.loss.item() == pytest.approx(LN2, abs=1e-2)  # bf16 rounding of the logits


# ------------------------------------------------------------------------------- FlexMatch

# Step 1 on pool images 0..3 (tau 0.95): images 0 and 2 are selected as class 0, image 1 as
# class 1, image 3 (max 0.5) is not. Record: [0, 1, 0, -1 x 7] -> sigma = [2, 1, 0], unused 7.
STEP1_WEAK = logits([0.96, 0.02, 0.02], [0.02, 0.97, 0.01], [0.98, 0.01, 0.01], [0.5, 0.3, 0.2])
STEP1_STRONG = logits([0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [0.5, 0.3, 0.2])


@pytest.mark.parametrize(
    "warmup, mapping, expected",
    [
        # beta = sigma / max(2, 7) = [2/7, 1/7, 0]; convex x/(2-x): [1/6, 1/13, 0]; * 0.95
        (True, "convex", [0.95 / 6, 0.95 / 13, 0.0]),  # [0.158333, 0.073077, 0]
        (True, "linear", [0.95 * 2 / 7, 0.95 / 7, 0.0]),  # [0.271429, 0.135714, 0]
        # beta = sigma / 2 = [1, 0.5, 0]; convex: [1, 0.5 / 1.5 = 1/3, 0]; * 0.95
        (False, "convex", [0.95, 0.95 / 3, 0.0]),  # [0.95, 0.316667, 0]
        (False, "linear", [0.95, 0.475, 0.0]),
    ],
)
def test_flexmatch_thresholds_after_one_step(warmup, mapping, expected):
    flex = method("flexmatch", threshold=0.95, warmup=warmup, mapping=mapping)
    assert flex.class_thresholds().tolist() == [0.0, 0.0, 0.0]  # beta = 0 before anything
    out = flex(STEP1_WEAK, STEP1_STRONG, torch.arange(4))
    # USB's order: this batch was masked with the thresholds before it (all 0): all kept;
    # CE: ln 2, ln 2, ln 2, -ln 0.5 = ln 2 -> loss ln 2
    assert out.mask.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert out.loss.item() == pytest.approx(LN2, abs=1e-6)
    assert flex.selected_label.tolist() == [0, 1, 0] + [-1] * 7
    assert flex.class_thresholds().tolist() == pytest.approx(expected, abs=1e-6)


def test_flexmatch_second_step_overwrites_the_record():
    flex = method("flexmatch", threshold=0.95, warmup=False)
    flex(STEP1_WEAK, STEP1_STRONG, torch.arange(4))  # thresholds now [0.95, 0.316667, 0]
    weak = logits(
        [0.90, 0.05, 0.05],  # image 3: class 0, 0.90 < 0.95: dropped, not selected
        [0.30, 0.50, 0.20],  # image 4: class 1, 0.50 >= 0.316667: kept, not selected
        [0.01, 0.01, 0.98],  # image 0: class 2, >= 0: kept, selected: record 0 -> 2
        [0.10, 0.20, 0.70],  # image 5: class 2: kept, not selected
    )
    out = flex(weak, STEP1_STRONG, torch.tensor([3, 4, 0, 5]))
    assert out.mask.tolist() == [0.0, 1.0, 1.0, 1.0]
    assert flex.selected_label.tolist() == [2, 1, 0] + [-1] * 7
    # sigma = [1, 1, 1] -> beta = 1 for all -> M(1) = 1 -> 0.95 everywhere
    assert flex.class_thresholds().tolist() == pytest.approx([0.95] * 3)


def test_flexmatch_record_is_int16_from_minus_one_and_int32_for_many_classes():
    flex = method("flexmatch", pool=5)
    assert flex.selected_label.dtype == torch.int16
    assert flex.selected_label.tolist() == [-1] * 5
    assert method("flexmatch", num_classes=40_000, pool=5).selected_label.dtype == torch.int32


# ------------------------------------------------------------------------------- FreeMatch


def test_freematch_tau_and_class_model_over_two_steps():
    free = method("freematch", ema_momentum=0.9)
    assert free.time_p.item() == pytest.approx(1 / 3)  # tau_0 = p_0(c) = 1/C
    strong = logits([0.5, 0.25, 0.25], [0.25, 0.5, 0.25])
    # Step 1: q = [.7 .2 .1], [.1 .6 .3]; mean max 0.65; mean q [.4 .4 .2]; labels 0, 1
    out = free(logits([0.7, 0.2, 0.1], [0.1, 0.6, 0.3]), strong, torch.arange(2))
    # tau_1 = 0.9/3 + 0.1 * 0.65 = 0.365; p_1 = 0.3 + 0.1 * [.4 .4 .2] = [.34 .34 .32]
    # h_1 = 0.3 + 0.1 * [.5 .5 0] = [.35 .35 .30]
    assert free.time_p.item() == pytest.approx(0.365, abs=1e-6)
    assert free.p_model.tolist() == pytest.approx([0.34, 0.34, 0.32], abs=1e-6)
    assert free.label_hist.tolist() == pytest.approx([0.35, 0.35, 0.30], abs=1e-6)
    # tau_1(c) = p_1 / 0.34 * 0.365 = [0.365, 0.365, 0.32/0.34 * 0.365 = 0.343529]
    assert free.class_thresholds().tolist() == pytest.approx([0.365, 0.365, 0.343529], abs=1e-6)
    assert out.mask.tolist() == [1.0, 1.0]  # 0.7 and 0.6 >= 0.365
    # Step 2: q = [.3 .3 .4] (class 2), [.36 .34 .30] (class 0); mean max 0.38
    out = free(logits([0.3, 0.3, 0.4], [0.36, 0.34, 0.30]), strong, torch.arange(2))
    # tau_2 = 0.9 * 0.365 + 0.1 * 0.38 = 0.3665
    # p_2 = 0.9 * [.34 .34 .32] + 0.1 * [.33 .32 .35] = [.339 .338 .323]
    # h_2 = 0.9 * [.35 .35 .30] + 0.1 * [.5 0 .5] = [.365 .315 .320]
    assert free.time_p.item() == pytest.approx(0.3665, abs=1e-6)
    assert free.p_model.tolist() == pytest.approx([0.339, 0.338, 0.323], abs=1e-6)
    assert free.label_hist.tolist() == pytest.approx([0.365, 0.315, 0.320], abs=1e-6)
    # tau_2(c) = p_2 / 0.339 * 0.3665 = [0.3665, 0.365419, 0.349202]
    assert free.class_thresholds().tolist() == pytest.approx([0.3665, 0.365419, 0.349202], abs=1e-6)
    # sample 0: 0.4 >= 0.349202 kept; sample 1: 0.36 < 0.3665 dropped
    assert out.mask.tolist() == [1.0, 0.0]
    # loss: CE of strong [.5 .25 .25] vs label 2 = ln 4, over the batch of 2: ln 2
    assert out.loss.item() == pytest.approx(LN2, abs=1e-6)


def test_freematch_fairness_term_by_hand():
    # a = SumNorm(p_t / h_t) = SumNorm([.5/.5, .3/.25, .2/.25] = [1, 1.2, .8]) = [1/3, .4, 4/15]
    p_model, label_hist = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.5, 0.25, 0.25])
    # kept strong predictions with argmax 0, 1, 2: h_bar uniform, so b = SumNorm(p_bar) = p_bar
    # = mean of the three = [0.3, 1/3, 11/30]
    strong = logits([0.6, 0.2, 0.2], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.1, 0.1, 0.8])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the fourth is not kept: it changes nothing
    # L_f = sum a log b = 1/3 ln .3 + .4 ln(1/3) + 4/15 ln(11/30)
    #     = -0.401324 - 0.439445 - 0.267547 = -1.108316
    expected = 1 / 3 * math.log(0.3) + 0.4 * math.log(1 / 3) + 4 / 15 * math.log(11 / 30)
    got = fairness_loss(strong, mask, p_model, label_hist)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(-1.108316, abs=1e-6)
    # nothing kept: the term is 0 (USB skips it), and finite
    assert fairness_loss(strong, torch.zeros(4), p_model, label_hist).item() == 0.0


def test_freematch_adds_the_weighted_fairness_term():
    free = method("freematch", fairness_weight=0.5).eval()  # fresh state: tau(c) = 1/3
    weak = logits([0.6, 0.2, 0.2], [0.2, 0.5, 0.3], [0.2, 0.2, 0.6])  # labels 0, 1, 2, kept
    strong = logits([0.6, 0.2, 0.2], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6])
    out = free(weak, strong, torch.arange(3))
    assert out.mask.tolist() == [1.0, 1.0, 1.0]
    # l_u = (-ln .6 - ln .5 - ln .6) / 3 = (0.510826 + 0.693147 + 0.510826) / 3 = 0.571600
    # a = uniform (p_0 / h_0), b = [0.3, 1/3, 11/30]: L_f = (ln .3 + ln 1/3 + ln 11/30) / 3
    #   = -1.101962; loss = 0.571600 + 0.5 * -1.101962 = 0.020619
    assert out.loss.item() == pytest.approx(0.020619, abs=1e-6)


# ------------------------------------------------------------------------------- SoftMatch

SOFT_WEAK = logits([0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.3, 0.4, 0.3])  # max .9, .6, .4
SOFT_STRONG = logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25], [0.25, 0.25, 0.5])


def test_softmatch_gaussian_weights_by_hand():
    soft = method("softmatch", ema_momentum=0.5)  # n_sigma 2
    assert soft.class_thresholds().tolist() == pytest.approx([1 / 3] * 3)
    out = soft(SOFT_WEAK, SOFT_STRONG, torch.arange(3))
    # batch: mean 1.9/3 = 0.633333; unbiased var ((.266667)^2 + (.033333)^2 + (.233333)^2) / 2
    #   = 0.126667 / 2 = 0.063333
    # mu_1 = 0.5/3 + 0.5 * 0.633333 = 0.483333; var_1 = 0.5 + 0.5 * 0.063333 = 0.531667
    assert soft.prob_max_mu_t.item() == pytest.approx(0.483333, abs=1e-6)
    assert soft.prob_max_var_t.item() == pytest.approx(0.531667, abs=1e-6)
    # .9, .6 >= mu: weight 1; .4: exp(-(.4 - .483333)^2 / (2 * .531667 / 4))
    #   = exp(-0.00694444 / 0.2658333) = exp(-0.0261233) = 0.974215
    assert out.mask.tolist() == pytest.approx([1.0, 1.0, 0.974215], abs=1e-6)
    assert soft.class_thresholds().tolist() == pytest.approx([0.483333] * 3, abs=1e-6)
    # loss = (ln 2 + ln 2 + 0.974215 * CE([.25 .25 .5] vs class 1 = ln 4)) / 3
    assert out.loss.item() == pytest.approx((2 * LN2 + 0.974215 * 2 * LN2) / 3, abs=1e-6)


def test_softmatch_weight_far_below_the_mean():
    soft = method("softmatch", ema_momentum=0.0)  # the batch's own mean and variance
    out = soft(SOFT_WEAK, SOFT_STRONG, torch.arange(3))
    # mu = 0.633333, var = 0.063333, 2 var / n_sigma^2 = 0.031667
    # .6: exp(-(0.033333^2) / 0.031667) = exp(-0.035088) = 0.965521
    # .4: exp(-(0.233333^2) / 0.031667) = exp(-1.719298) = 0.179192
    assert out.mask.tolist() == pytest.approx([1.0, 0.965521, 0.179192], abs=1e-6)


# ---------------------------------------------------------------------- distribution alignment

ALIGN_PROBS = torch.tensor([[0.5, 0.4, 0.1], [0.8, 0.1, 0.1]])


def test_dist_align_by_hand():
    align = DistAlign(3, momentum=0.5)
    aligned = align(ALIGN_PROBS, Sync())
    # p_model = 0.5/3 + 0.5 * mean = 0.166667 + 0.5 * [.65 .25 .10] = [.491667 .291667 .216667]
    assert align.p_model.tolist() == pytest.approx([0.491667, 0.291667, 0.216667], abs=1e-6)
    # row 0: [.5/.491667, .4/.291667, .1/.216667] = [1.016949, 1.371429, 0.461538] / 2.849916
    # row 1: [.8/.491667, .1/.291667, .1/.216667] = [1.627119, 0.342857, 0.461538] / 2.431514
    expected = [[0.356835, 0.481218, 0.161947], [0.669180, 0.141006, 0.189815]]
    assert torch.allclose(aligned, torch.tensor(expected), atol=1e-5)
    # without an update the running mean stays, and a uniform p_model leaves probs unchanged
    fresh = DistAlign(3, momentum=0.5)
    assert torch.allclose(fresh(ALIGN_PROBS, Sync(), update=False), ALIGN_PROBS, atol=1e-6)
    assert fresh.p_model.tolist() == pytest.approx([1 / 3] * 3)
    # a given target: q * [2 1 1] renormalised: [1.0, .4, .1] / 1.5
    skewed = DistAlign(3, momentum=0.5, p_target=torch.tensor([0.5, 0.25, 0.25]))
    got = skewed(ALIGN_PROBS[:1], Sync(), update=False)
    assert got[0].tolist() == pytest.approx([2 / 3, 0.4 / 1.5, 0.1 / 1.5], abs=1e-5)


def test_alignment_changes_targets_but_not_softmatch_targets():
    weak, strong = ALIGN_PROBS.log(), logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    # aligned row 0 is [0.356835, 0.481218, 0.161947] (above): its argmax moves 0 -> 1
    fix = method("fixmatch", threshold=0.45, dist_align=True, ema_momentum=0.5)
    out = fix(weak, strong, torch.arange(2))
    assert out.pseudo_label.tolist() == [1, 0] and out.mask.tolist() == [1.0, 1.0]
    # loss: (CE vs 1 = ln 4 + CE vs 0 = ln 2) / 2 = 1.5 ln 2
    assert out.loss.item() == pytest.approx(1.5 * LN2, abs=1e-6)
    # SoftMatch: UA feeds the weights only; targets from the raw logits (argmax 0, 0)
    soft = method("softmatch", dist_align=True, ema_momentum=0.5)
    out = soft(weak, strong, torch.arange(2))
    assert out.pseudo_label.tolist() == [0, 0]
    # its mean confidence is that of the aligned maxima: 0.5/3 + 0.5 * (0.481218 + 0.669180) / 2
    assert soft.prob_max_mu_t.item() == pytest.approx(1 / 6 + (0.481218 + 0.669180) / 4, abs=1e-5)


def test_debias_by_hand():
    # p_hat = 0.5/3 + 0.5 * mean(ALIGN_PROBS) = [.491667 .291667 .216667], as DistAlign's p_model
    debias = Debias(3, momentum=0.5, tau=0.4)
    offset = debias(ALIGN_PROBS.log(), Sync())
    p_hat = [0.491667, 0.291667, 0.216667]
    assert debias.p_hat.tolist() == pytest.approx(p_hat, abs=1e-6)
    assert offset.tolist() == pytest.approx([0.4 * math.log(p) for p in p_hat], abs=1e-5)
    # no update: the running mean stays, the offset is read from it
    assert torch.equal(debias(ALIGN_PROBS.log(), Sync(), update=False), offset)
    assert debias.p_hat.tolist() == pytest.approx(p_hat, abs=1e-6)


def test_debias_moves_targets_and_adjusts_the_strong_logits():
    weak, strong = ALIGN_PROBS.log(), logits([0.5, 0.25, 0.25], [0.5, 0.25, 0.25])
    # tau = 1: softmax(log p - log p_hat) = p / p_hat renormalised, the aligned rows of
    # test_dist_align_by_hand: [0.356835, 0.481218, 0.161947] and [0.669180, 0.141006, 0.189815]
    fix = method("fixmatch", threshold=0.45, debias=1.0, ema_momentum=0.5)
    out = fix(weak, strong, torch.arange(2))
    assert out.pseudo_label.tolist() == [1, 0] and out.mask.tolist() == [1.0, 1.0]
    # strong: softmax(log q + log p_hat) = q * p_hat renormalised:
    # [.5 * .491667, .25 * .291667, .25 * .216667] / .372917 = [.659218, .195531, .145251]
    # loss: (CE vs 1 = -ln .195531 = 1.632037, CE vs 0 = -ln .659218 = 0.416701) / 2 = 1.024369
    assert out.loss.item() == pytest.approx(1.024369, abs=1e-5)
    # without it: the raw argmax of both rows is 0 (0.5 and 0.8 pass 0.45), the raw strong logits
    plain = method("fixmatch", threshold=0.45)(weak, strong, torch.arange(2))
    assert plain.pseudo_label.tolist() == [0, 0]
    assert plain.loss.item() == pytest.approx(LN2, abs=1e-6)  # CE vs 0 = ln 2, both rows


# ------------------------------------------------------------------- state, eval, two ranks

ALL = [
    ("fixmatch", {"dist_align": True}),
    ("flexmatch", {"threshold": 0.6}),
    ("flexmatch", {"threshold": 0.6, "dist_align": True, "warmup": False}),
    ("freematch", {"fairness_weight": 0.1}),
    ("freematch", {"debias": 0.4}),
    ("softmatch", {"dist_align": True}),
]


def batches(steps: int, size: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """Random (weak, strong, index) batches over a pool of 32 images, each index once a batch."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        weak = torch.randn(size, 3, generator=gen) * 3
        strong = torch.randn(size, 3, generator=gen)
        out.append((weak, strong, torch.randperm(32, generator=gen)[:size]))
    return out


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name, spec", ALL)
def test_state_dict_round_trip_continues_identically(name, spec, tmp_path):
    first = method(name, pool=32, ema_momentum=0.7, **spec)
    steps = batches(3)
    for batch in steps[:2]:
        first(*batch)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = method(name, pool=32, ema_momentum=0.7, **spec)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    a, b = first(*steps[2]), resumed(*steps[2])
    assert torch.equal(a.loss, b.loss) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.pseudo_label, b.pseudo_label)
    for key, value in first.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_state_dict_holds_every_statistic():
    keys = {name: sorted(method(name, dist_align=True).state_dict()) for name in METHODS[1:]}
    assert keys == {
        "fixmatch": ["align.p_model", "align.p_target"],
        "flexmatch": ["align.p_model", "align.p_target", "learning_effect", "selected_label"],
        "freematch": ["align.p_model", "align.p_target", "label_hist", "p_model", "time_p"],
        "softmatch": ["align.p_model", "align.p_target", "prob_max_mu_t", "prob_max_var_t"],
    }
    assert sorted(method("fixmatch", debias=0.4).state_dict()) == ["debias.p_hat"]


@pytest.mark.parametrize("name, spec", ALL)
def test_eval_mode_updates_no_state(name, spec):
    module = method(name, pool=32, **spec)
    module(*batches(1)[0])  # move the state away from its start
    before = state(module)
    module.eval()
    out = module(*batches(1, seed=1)[0])
    assert torch.isfinite(out.loss)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


class ThreadSync(Sync):
    """Two ranks as two threads: each collective posts its tensor and reads both."""

    def __init__(self, rank: int, board: list, barrier: threading.Barrier) -> None:
        self.rank, self.board, self.barrier = rank, board, barrier

    def exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.board[self.rank] = t.clone()
        self.barrier.wait()
        both = list(self.board)
        self.barrier.wait()  # both have read before anyone posts the next one
        return both

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.exchange(t)).mean(dim=0)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.exchange(t))


@pytest.mark.parametrize("name, spec", ALL)
def test_two_ranks_hold_the_single_process_state(name, spec):
    steps = batches(3, size=8)
    single = method(name, pool=32, ema_momentum=0.7, **spec)
    for batch in steps:
        single(*batch)
    ranks = [method(name, pool=32, ema_momentum=0.7, **spec) for _ in range(2)]
    board, barrier, errors = [None, None], threading.Barrier(2, timeout=20), []

    def run(rank: int) -> None:
        sync = ThreadSync(rank, board, barrier)
        try:
            for batch in steps:  # each rank takes its half of the global batch
                ranks[rank](*(t[rank * 4 : rank * 4 + 4] for t in batch), sync=sync)
        except Exception as error:  # surface it in the test, not in a hung thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0].state_dict()[key], ranks[1].state_dict()[key]), key
        if value.is_floating_point():  # mean of the two means vs mean of the 8: rounding only
            assert torch.allclose(ranks[0].state_dict()[key], value, atol=1e-6), key
        else:
            assert torch.equal(ranks[0].state_dict()[key], value), key
    if name == "flexmatch":
        assert (single.selected_label >= 0).sum() > 0  # the record was really exercised
