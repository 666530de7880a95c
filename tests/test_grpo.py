"""Tests of dynalign.grpo: expected values are worked out by hand in each test, not by the code under test."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from dynalign import grpo
from dynalign.config import ConfigError, GRPOConfig

EPS = 1e-4
NAN = float("nan")


def close(actual: torch.Tensor, expected: Any, atol: float = 1e-6, rtol: float = 0.0) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64),
                               atol=atol, rtol=rtol)


# ----------------------------------------------------------------------- advantages

REWARDS = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 2.0])  # two groups of 4


def test_group_scale_divides_by_each_groups_std() -> None:
    # group 1: mean 2.5, var (2.25 + .25 + .25 + 2.25) / 4 = 1.25
    # group 2: mean .5, var (3 * .25 + 2.25) / 4 = .75
    s1, s2 = math.sqrt(1.25) + EPS, math.sqrt(0.75) + EPS
    expected = [-1.5 / s1, -0.5 / s1, 0.5 / s1, 1.5 / s1, -0.5 / s2, -0.5 / s2, -0.5 / s2, 1.5 / s2]
    close(grpo.group_advantages(REWARDS, 4, scale="group"), expected)


def test_batch_scale_divides_by_the_batch_std() -> None:
    # batch mean 12 / 8 = 1.5; squared deviations .25 .25 2.25 6.25 2.25 2.25 2.25 .25 sum to 16 -> var 2
    s = math.sqrt(2.0) + EPS
    expected = [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s, 1.5 / s]
    close(grpo.group_advantages(REWARDS, 4, scale="batch"), expected)


def test_none_scale_only_centres() -> None:
    expected = [-1.5, -0.5, 0.5, 1.5, -0.5, -0.5, -0.5, 1.5]
    close(grpo.group_advantages(REWARDS, 4, scale="none"), expected)


def test_default_scale_is_group_and_eps_is_used() -> None:
    rewards = torch.tensor([0.0, 2.0])  # mean 1, std 1
    close(grpo.group_advantages(rewards, 2), [-1 / (1 + EPS), 1 / (1 + EPS)])
    close(grpo.group_advantages(rewards, 2, eps=0.5), [-1 / 1.5, 1 / 1.5])


def test_nan_rewards_are_left_out_and_get_zero() -> None:
    # group 1 finite rewards 1, 3: mean 2, std 1; group 2 is all NaN -> zeros
    rewards = torch.tensor([1.0, NAN, 3.0, NAN, NAN, NAN, NAN, NAN])
    adv = grpo.group_advantages(rewards, 4, scale="group")
    close(adv, [-1 / (1 + EPS), 0.0, 1 / (1 + EPS), 0.0, 0.0, 0.0, 0.0, 0.0])
    close(grpo.group_advantages(rewards, 4, scale="none"), [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_nan_rewards_are_left_out_of_the_batch_std() -> None:
    # groups [0, 2, nan] (mean 1) and [4, nan, 6] (mean 5)
    # batch std over 0, 2, 4, 6: mean 3, var (9 + 1 + 1 + 9) / 4 = 5
    rewards = torch.tensor([0.0, 2.0, NAN, 4.0, NAN, 6.0])
    s = math.sqrt(5.0) + EPS
    close(grpo.group_advantages(rewards, 3, scale="batch"), [-1 / s, 1 / s, 0.0, -1 / s, 0.0, 1 / s])


def test_all_nan_batch_gives_zeros_for_every_scale() -> None:
    for scale in grpo.ADVANTAGE_SCALES:
        close(grpo.group_advantages(torch.full((4,), NAN), 2, scale=scale), [0.0] * 4)


def test_constant_group_gets_zero_advantage() -> None:
    close(grpo.group_advantages(torch.tensor([3.0, 3.0, 3.0]), 3), [0.0, 0.0, 0.0])


def test_integer_rewards_are_accepted() -> None:
    close(grpo.group_advantages(torch.tensor([0, 2]), 2, scale="none"), [-1.0, 1.0])


def test_group_size_must_divide_the_rewards() -> None:
    with pytest.raises(ValueError, match=r"number of rewards \(5\).*group_size \(2\)"):
        grpo.group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size"):
        grpo.zero_spread_groups(torch.zeros(5), 2)


def test_unknown_scale_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown advantage scale 'std'; valid: group, batch, none"):
        grpo.group_advantages(REWARDS, 4, scale="std")


def test_advantage_scales() -> None:
    assert grpo.ADVANTAGE_SCALES == ("group", "batch", "none")


def test_zero_spread_groups() -> None:
    rewards = torch.tensor([
        1.0, 1.0, 1.0,  # all equal -> True
        1.0, NAN, 1.0,  # finite ones equal -> True
        NAN, NAN, 2.0,  # one finite -> True
        NAN, NAN, NAN,  # none finite -> True
        1.0, 2.0, 1.0,  # spread -> False
        0.0, NAN, 5.0,  # spread among finite -> False
    ])
    assert grpo.zero_spread_groups(rewards, 3).tolist() == [True, True, True, True, False, False]


# ------------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.3]])
    ref_logp = torch.tensor([[-1.5, -1.0, -0.3]])  # x = ref - logp = -0.5, 1.0, 0.0
    close(grpo.kl_penalty(logp, ref_logp, "k1"), [[0.5, -1.0, 0.0]])
    close(grpo.kl_penalty(logp, ref_logp, "k2"), [[0.125, 0.5, 0.0]])
    close(grpo.kl_penalty(logp, ref_logp, "k3"), [[math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0]])
    close(grpo.kl_penalty(logp, ref_logp), [[math.exp(-0.5) + 0.5 - 1, math.e - 2, 0.0]])  # k3 default


def test_kl_log_ratio_is_clamped() -> None:
    logp = torch.tensor([[-200.0, 0.0]])
    ref_logp = torch.tensor([[0.0, -200.0]])  # x = 200 and -200, clamped to 20 and -20
    assert grpo.KL_LOG_RATIO_CLAMP == 20.0
    close(grpo.kl_penalty(logp, ref_logp, "k3"), [[math.exp(20) - 21, math.exp(-20) + 19]], atol=1e-5,
          rtol=1e-6)
    close(grpo.kl_penalty(logp, ref_logp, "k2"), [[200.0, 200.0]])
    close(grpo.kl_penalty(logp, ref_logp, "k1"), [[-20.0, 20.0]])


def test_kl_registry_and_unknown_estimator() -> None:
    assert sorted(grpo.KL_ESTIMATORS) == ["k1", "k2", "k3"]
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; valid: k1, k2, k3"):
        grpo.kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


# ---------------------------------------------------------------------- policy loss
# Two sequences of 3 tokens; ratios r chosen by hand, advantages +1 and -2, eps 0.2:
#   row 0, A = +1, r = 1.1, 1.5, (0.7 padded): objective min(rA, clip(r)A) = 1.1, 1.2 -> loss -1.1, -1.2
#   row 1, A = -2, r = 0.5, 1.0, 1.3: objective = min(-1.0, -1.6), -2.0, min(-2.6, -2.4) -> loss 1.6, 2.0, 2.6

RATIOS = [[1.1, 1.5, 0.7], [0.5, 1.0, 1.3]]
OLD_LOGP = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
LOGP = OLD_LOGP + torch.tensor(RATIOS).log()
ADV = torch.tensor([1.0, -2.0])
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]])
ROW0, ROW1 = -1.1 - 1.2, 1.6 + 2.0 + 2.6  # masked token-loss sums: -2.3 and 6.2


def loss_of(loss_type: str, **kwargs: object) -> tuple[torch.Tensor, dict[str, float]]:
    return grpo.policy_loss(loss_type, LOGP, OLD_LOGP, ADV, MASK, **kwargs)  # type: ignore[arg-type]


def test_loss_names() -> None:  # a new loss also needs a case in test_each_loss_declares_its_normaliser
    assert sorted(grpo.POLICY_LOSSES) == ["bnpo", "dapo", "dr_grpo", "grpo", "gspo"]


def test_grpo_aggregation() -> None:
    loss, _ = loss_of("grpo")
    close(loss, (ROW0 / 2 + ROW1 / 3) / 2)  # (-1.15 + 2.0667) / 2


def test_bnpo_aggregation() -> None:
    close(loss_of("bnpo")[0], (ROW0 + ROW1) / 5)  # 0.78


def test_dr_grpo_aggregation() -> None:
    close(loss_of("dr_grpo", max_completion_length=4)[0], (ROW0 + ROW1) / (2 * 4))  # 0.4875
    with pytest.raises(ValueError, match="max_completion_length"):
        loss_of("dr_grpo")


def test_dapo_aggregation() -> None:
    close(loss_of("dapo", total_tokens=10)[0], (ROW0 + ROW1) / 10)
    close(loss_of("dapo", total_tokens=torch.tensor(10.0))[0], (ROW0 + ROW1) / 10)
    close(loss_of("dapo")[0], (ROW0 + ROW1) / 5)  # falls back to the local token count


def test_gspo_aggregation() -> None:
    # row 0: s = exp((ln 1.1 + ln 1.5) / 2) = sqrt(1.65) = 1.2845 > 1.2, A > 0 -> objective 1.2
    # row 1: s = (0.5 * 1.0 * 1.3) ** (1/3) = 0.8662 in [0.8, 1.2] -> objective -2 s
    s0, s1 = math.sqrt(1.65), 0.65 ** (1 / 3)
    loss, stats = loss_of("gspo")
    close(loss, (-1.2 + 2 * s1) / 2)
    assert stats["clip_frac_high"] == pytest.approx(0.5)
    assert stats["clip_frac_low"] == pytest.approx(0.0)
    assert stats["ratio_mean"] == pytest.approx((s0 + s1) / 2, abs=1e-6)


def test_gspo_low_clip_at_sequence_level() -> None:
    # one sequence, r = 0.5 and 0.5 -> s = 0.5 < 0.8 with A = -1: objective min(-0.5, -0.8) = -0.8
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]])
    loss, stats = grpo.policy_loss("gspo", logp, torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2))
    close(loss, 0.8)
    assert stats["clip_frac_low"] == pytest.approx(1.0)


def test_clip_fractions_and_ratio_mean() -> None:
    _, stats = loss_of("bnpo")
    # low side: r = 0.5 < 0.8 with A < 0 (row 1 token 0); high side: r = 1.5 > 1.2 with A > 0 (row 0 token 1).
    # r = 1.3 with A < 0 and the padded r = 0.7 do not count.
    assert stats["clip_frac_low"] == pytest.approx(1 / 5)
    assert stats["clip_frac_high"] == pytest.approx(1 / 5)
    assert stats["ratio_mean"] == pytest.approx((1.1 + 1.5 + 0.5 + 1.0 + 1.3) / 5, abs=1e-6)
    assert stats["tokens"] == 5.0
    assert "kl_mean" not in stats and "dual_clip_frac" not in stats
    assert all(isinstance(value, float) for value in stats.values())


def test_asymmetric_clip_higher() -> None:
    # eps_high 0.28: row 0 token 1 objective becomes 1.28 instead of 1.2
    loss, stats = loss_of("bnpo", clip_eps_high=0.28)
    close(loss, (-1.1 - 1.28 + ROW1) / 5)
    assert stats["clip_frac_high"] == pytest.approx(1 / 5)
    # eps_low 0.6: row 1 token 0 (r = 0.5) is within [0.4, 1.28]: objective -1.0
    loss, stats = loss_of("bnpo", clip_eps_low=0.6, clip_eps_high=0.28)
    close(loss, (-1.1 - 1.28 + 1.0 + 2.0 + 2.6) / 5)
    assert stats["clip_frac_low"] == 0.0


def test_dual_clip_bounds_negative_advantages_only() -> None:
    # row 0 (A = -1): r = 4 -> min(-4, -1.2) = -4, dual c = 3 -> max(-4, -3) = -3; r = 0.5 -> -0.8 unchanged
    # row 1 (A = +1): r = 4 -> min(4, 1.2) = 1.2 untouched; r = 0.5 -> 0.5
    logp = torch.tensor([[4.0, 0.5], [4.0, 0.5]]).log()
    old, adv, mask = torch.zeros(2, 2), torch.tensor([-1.0, 1.0]), torch.ones(2, 2)
    loss, stats = grpo.policy_loss("grpo", logp, old, adv, mask, dual_clip=3.0)
    close(loss, ((3.0 + 0.8) / 2 + (-1.2 - 0.5) / 2) / 2)
    assert stats["dual_clip_frac"] == pytest.approx(1 / 4)
    loss, _ = grpo.policy_loss("grpo", logp, old, adv, mask)
    close(loss, ((4.0 + 0.8) / 2 + (-1.2 - 0.5) / 2) / 2)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        grpo.policy_loss("grpo", logp, old, adv, mask, dual_clip=1.0)


def test_kl_term_is_added_per_token() -> None:
    # x = ref - logp per token; k3 = exp(x) - x - 1; beta 0.1, same aggregation as the policy term
    x = [[0.5, -0.5, 9.0], [1.0, 0.0, -1.0]]
    k3 = [[math.exp(v) - v - 1 for v in row] for row in x]
    ref_logp = LOGP + torch.tensor(x)
    loss, stats = loss_of("grpo", ref_logp=ref_logp, beta=0.1)
    row0 = (ROW0 + 0.1 * (k3[0][0] + k3[0][1])) / 2
    row1 = (ROW1 + 0.1 * sum(k3[1])) / 3
    close(loss, (row0 + row1) / 2, atol=1e-5)
    assert stats["kl_mean"] == pytest.approx((k3[0][0] + k3[0][1] + sum(k3[1])) / 5, abs=1e-5)
    loss, _ = loss_of("bnpo", ref_logp=ref_logp, beta=0.1, kl_estimator="k2")
    k2 = 0.1 * (0.125 + 0.125 + 0.5 + 0.0 + 0.5)
    close(loss, (ROW0 + ROW1 + k2) / 5, atol=1e-5)
    # gspo averages the KL like grpo: per-sequence token mean, then over sequences
    loss, _ = loss_of("gspo", ref_logp=ref_logp, beta=0.1)
    kl = ((k3[0][0] + k3[0][1]) / 2 + sum(k3[1]) / 3) / 2
    close(loss, (-1.2 + 2 * 0.65 ** (1 / 3)) / 2 + 0.1 * kl, atol=1e-5)


def test_kl_is_reported_but_not_added_at_beta_zero() -> None:
    loss, stats = loss_of("bnpo", ref_logp=LOGP + 1.0)
    close(loss, (ROW0 + ROW1) / 5)
    assert stats["kl_mean"] == pytest.approx(math.e - 2, abs=1e-5)


def test_all_masked_row() -> None:
    # row 1 has no tokens: grpo/gspo average over row 0 only; token sums simply lose row 1
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    for loss_type, expected in [("grpo", ROW0 / 2), ("bnpo", ROW0 / 2), ("dapo", ROW0 / 2),
                                ("gspo", -1.2)]:
        loss, stats = grpo.policy_loss(loss_type, LOGP, OLD_LOGP, ADV, mask)
        close(loss, expected)
        assert all(math.isfinite(v) for v in stats.values())
    close(grpo.policy_loss("dr_grpo", LOGP, OLD_LOGP, ADV, mask, max_completion_length=3)[0], ROW0 / 6)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_fully_masked_batch_gives_zero_loss_with_grad(loss_type: str) -> None:
    logp = LOGP.clone().requires_grad_()
    old = OLD_LOGP.clone()
    old[0, 0] = -1e4  # garbage under padding must not leak as inf/NaN
    loss, stats = grpo.policy_loss(loss_type, logp, old, ADV, torch.zeros(2, 3), max_completion_length=3,
                                   ref_logp=LOGP - 1e4, beta=0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert logp.grad is not None and torch.equal(logp.grad, torch.zeros(2, 3))
    assert all(math.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "gspo"])
def test_padding_garbage_does_not_produce_nan(loss_type: str) -> None:
    logp = LOGP.clone().requires_grad_()
    old = OLD_LOGP.clone()
    old[0, 2] = -1e4  # padded position: ratio would be exp(1e4) = inf
    loss, _ = grpo.policy_loss(loss_type, logp, old, ADV, MASK, max_completion_length=3)
    loss.backward()
    assert torch.isfinite(loss) and logp.grad is not None and torch.isfinite(logp.grad).all()
    assert logp.grad[0, 2] == 0.0


# At ratio 1 (old_logp = logp.detach()) with A = +1, -1 and equal lengths the loss is 0,
# but d loss / d logp = -A * mask / denominator.
GRAD_MASK = torch.tensor([[1, 1, 0], [1, 0, 1]])


@pytest.mark.parametrize("loss_type, denominators", [
    ("grpo", [[2 * 2] * 3, [2 * 2] * 3]),  # 2 tokens per row, 2 rows
    ("gspo", [[2 * 2] * 3, [2 * 2] * 3]),  # d s_i / d logp_t = s_i / |y_i| with s_i = 1
    ("bnpo", [[4] * 3, [4] * 3]),  # 4 tokens
    ("dr_grpo", [[2 * 5] * 3, [2 * 5] * 3]),  # B * max_completion_length
    ("dapo", [[16] * 3, [16] * 3]),  # total_tokens
])
def test_gradient_at_ratio_one(loss_type: str, denominators: list[list[float]]) -> None:
    logp = torch.tensor([[-0.5, -1.5, -2.0], [-0.7, -0.1, -3.0]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo.policy_loss(loss_type, logp, logp.detach(), adv, GRAD_MASK, max_completion_length=5,
                                   total_tokens=16)
    assert abs(loss.item()) < 1e-7
    assert stats["ratio_mean"] == pytest.approx(1.0)
    loss.backward()
    signs = [[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]  # -A per row
    expected = [[signs[b][t] * float(GRAD_MASK[b, t]) / denominators[b][t] for t in range(3)]
                for b in range(2)]
    assert logp.grad is not None
    close(logp.grad, expected)


def test_unknown_loss_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown loss_type 'ppo'; valid: bnpo, dapo, dr_grpo, grpo, gspo"):
        loss_of("ppo")
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        loss_of("grpo", kl_estimator="kl")


def test_shape_mismatch_is_reported() -> None:
    with pytest.raises(ValueError, match="advantages must be"):
        grpo.policy_loss("grpo", LOGP, OLD_LOGP, ADV[:1], MASK)
    with pytest.raises(ValueError, match="mask shape"):
        grpo.policy_loss("grpo", LOGP, OLD_LOGP, ADV, MASK[:, :2])


def test_register_policy_loss_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        grpo.register_policy_loss("grpo", units=None)(grpo.POLICY_LOSSES["grpo"].fn)


# Three rows of 4 tokens: 2 counted, 3 counted, none (e.g. truncated) -> 2 sequences with tokens,
# 5 tokens, 3 rows.
UNITS_MASK = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]])


@pytest.mark.parametrize("loss_type, units", [
    ("grpo", 2.0), ("gspo", 2.0), ("bnpo", 5.0), ("dr_grpo", 3.0), ("dapo", None),
])
def test_each_loss_declares_its_normaliser(loss_type: str, units: float | None) -> None:
    loss = grpo.get_policy_loss(loss_type)
    assert (None if loss.units is None else loss.units(UNITS_MASK)) == units
    assert loss.uses_total_tokens == (units is None)  # dapo divides by the whole batch's tokens


# ------------------------------------------------------------------- config schema


def test_config_rejects_unknown_names() -> None:
    with pytest.raises(ConfigError, match="grpo.loss_type") as info:
        GRPOConfig(loss_type="ppo").validate("grpo")
    assert "bnpo, dapo, dr_grpo, grpo, gspo" in str(info.value)
    with pytest.raises(ConfigError, match="grpo.kl_estimator") as info:
        GRPOConfig(kl_estimator="k4").validate("grpo")
    assert "k1, k2, k3" in str(info.value)


# ------------------------------------------------------------------------ log-probs


def naive_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).squeeze(-1)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1000])  # 15 rows: 4 and 7 do not divide
def test_token_logprobs_matches_naive_fp32(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=gen) * 4
    labels = torch.randint(0, 11, (3, 5), generator=gen)
    out = grpo.token_logprobs(logits, labels, chunk_size=chunk_size)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logprobs(logits, labels), atol=1e-6, rtol=0)


def test_token_logprobs_bf16_is_upcast() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, 9, 1000, generator=gen) * 5).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (4, 9), generator=gen)
    out = grpo.token_logprobs(logits, labels, chunk_size=5)
    assert out.dtype == torch.float32
    # same bf16 values, float32 arithmetic on both sides
    torch.testing.assert_close(out, naive_logprobs(logits, labels), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-7), (torch.bfloat16, 1e-3)])
def test_token_logprobs_gradient_matches_naive(dtype: torch.dtype, atol: float) -> None:
    gen = torch.Generator().manual_seed(2)
    base = (torch.randn(2, 7, 13, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 13, (2, 7), generator=gen)
    weights = torch.randn(2, 7, generator=gen)
    chunked, naive = base.clone().requires_grad_(), base.clone().requires_grad_()
    (grpo.token_logprobs(chunked, labels, chunk_size=3) * weights).sum().backward()
    (naive_logprobs(naive, labels) * weights).sum().backward()
    assert chunked.grad is not None and naive.grad is not None
    assert chunked.grad.dtype == dtype
    torch.testing.assert_close(chunked.grad.float(), naive.grad.float(), atol=atol, rtol=1e-2)


def test_token_logprobs_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (2, 3), generator=gen)
    assert torch.autograd.gradcheck(lambda x: grpo.token_logprobs(x, labels, chunk_size=4), (logits,))


def test_token_logprobs_on_a_non_contiguous_slice() -> None:
    gen = torch.Generator().manual_seed(4)
    full = torch.randn(3, 8, 6, generator=gen, requires_grad=True)
    labels = torch.randint(0, 6, (3, 4), generator=gen)
    sliced = full[:, 3:7]  # [3, 4, 6]: cannot be flattened without a copy
    out = grpo.token_logprobs(sliced, labels, chunk_size=5)
    torch.testing.assert_close(out, naive_logprobs(sliced, labels), atol=1e-6, rtol=0)
    out.sum().backward()
    reference = full.detach().clone().requires_grad_()
    naive_logprobs(reference[:, 3:7], labels).sum().backward()
    assert full.grad is not None and reference.grad is not None
    torch.testing.assert_close(full.grad, reference.grad, atol=1e-6, rtol=0)


def test_token_logprobs_rejects_bad_shapes_and_chunks() -> None:
    with pytest.raises(ValueError, match="disagree"):
        grpo.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        grpo.token_logprobs(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), chunk_size=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 100])  # 3: shared rows straddle no chunk, others do
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_read_rows_by_source(chunk_size: int, temperature: float) -> None:
    """Tokens that read a shared row, a row no token reads, and a temperature: the values and the
    gradient of the same log-softmax written out on the gathered rows."""
    gen = torch.Generator().manual_seed(6)
    kept = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64) * 3  # [R=2, K=4, V]: 8 rows
    source = torch.tensor([[0, 1, 2], [0, 3, 5], [0, 6, 6]])  # row 0 three times, 6 twice, 4 and 7 never
    labels = torch.randint(0, 9, (3, 3), generator=gen)
    weights = torch.randn(3, 3, generator=gen, dtype=torch.float64)
    chunked, naive = kept.clone().requires_grad_(), kept.clone().requires_grad_()
    out = grpo.token_logprobs(chunked, labels, chunk_size, source=source, temperature=temperature)
    gathered = naive.reshape(-1, 9)[source] / temperature  # [3, 3, V]
    expected = torch.log_softmax(gathered, -1).gather(-1, labels[..., None]).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(chunked.grad, naive.grad, atol=1e-12, rtol=0)
    assert chunked.grad.reshape(-1, 9)[[4, 7]].abs().sum() == 0  # rows nobody reads
    assert torch.autograd.gradcheck(
        lambda x: grpo.token_logprobs(x, labels, chunk_size, source=source, temperature=temperature),
        (kept.clone().requires_grad_(),))


@pytest.fixture
def threads():
    """Sets torch's intra-op thread count for one test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_a_shared_rows_gradient_sums_in_one_order_on_any_number_of_threads(threads) -> None:
    """A packed row's last prompt position predicts the first token of each of its answers, so the
    backward sums several tokens' gradients into one row. The sum must not depend on thread timing
    (a packed run would not resume bitwise): with enough tokens for torch to split the work, two
    threads give bitwise the one-thread gradient (an accumulating ``index_put_`` would not)."""
    gen = torch.Generator().manual_seed(7)
    tokens = 1 << 18  # past torch's grain size for parallel CPU kernels
    logits = torch.randn(16, 8, generator=gen, requires_grad=True)  # [R, V]
    source = torch.randint(0, 16, (tokens,), generator=gen)  # every row shared by ~16k tokens
    labels = torch.randint(0, 8, (tokens,), generator=gen)
    upstream = torch.randn(tokens, generator=gen)

    def gradient(num_threads: int) -> torch.Tensor:
        threads(num_threads)
        logits.grad = None
        (grpo.token_logprobs(logits, labels, 4, source=source) * upstream).sum().backward()
        assert logits.grad is not None
        return logits.grad.clone()

    serial = gradient(1)
    for _ in range(5):
        assert torch.equal(gradient(2), serial)


def test_token_logprobs_refuse_a_bad_source_or_temperature() -> None:
    logits, labels = torch.zeros(2, 3, 4), torch.zeros(2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="source must index the 6 rows"):
        grpo.token_logprobs(logits, labels, source=torch.tensor([[0, 1], [2, 6]]))
    with pytest.raises(ValueError, match="source .* and labels .* disagree"):
        grpo.token_logprobs(logits, labels, source=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        grpo.token_logprobs(logits, labels, source=torch.zeros(2, 2, dtype=torch.long), temperature=0.0)


def test_token_entropy_matches_naive() -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, 7, generator=gen, requires_grad=True)
    masked = logits.detach().clone()
    masked[0, 0, :3] = -float("inf")  # a banned part of the vocabulary
    for values in (logits, masked, logits.detach().to(torch.bfloat16)):
        probs = torch.softmax(values.detach().float(), -1)
        naive = -(probs * torch.log_softmax(values.detach().float(), -1)).nan_to_num().sum(-1)
        entropy = grpo.token_entropy(values, chunk_size=3)
        assert not entropy.requires_grad and entropy.dtype == torch.float32
        torch.testing.assert_close(entropy, naive, atol=1e-6, rtol=0)
    # uniform over 4 symbols: ln 4
    close(grpo.token_entropy(torch.zeros(1, 1, 4)), [[math.log(4)]])


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_matches_naive_per_token(temperature: float) -> None:
    model = tiny_llama()
    prompt_len, completion_len = 4, 3
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11],
                              [0, 0, 12, 13, 14, 15, 0]])  # row 1: left-padded prompt, right-padded answer
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                                   [0, 0, 1, 1, 1, 1, 0]])
    logp, entropy = grpo.completion_logprobs(model, input_ids, attention_mask, completion_len,
                                             temperature=temperature, with_entropy=True, chunk_size=2)
    assert logp.shape == entropy.shape == (2, completion_len)
    assert logp.requires_grad and not entropy.requires_grad  # the entropy is a statistic
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    for b in range(2):
        for c in range(completion_len):
            position = prompt_len + c  # the token scored; predicted by the logits one position earlier
            if not attention_mask[b, position]:
                continue  # an answer's padding: meaningless values, masked in every loss
            dist = torch.log_softmax(logits[b, position - 1] / temperature, -1)
            assert logp[b, c].item() == pytest.approx(dist[input_ids[b, position]].item(), abs=1e-5)
            assert entropy[b, c].item() == pytest.approx(-(dist.exp() * dist).sum().item(), abs=1e-5)
    only_logp = grpo.completion_logprobs(model, input_ids, attention_mask, completion_len,
                                         temperature=temperature)
    torch.testing.assert_close(only_logp, logp)


def test_the_lm_head_sees_only_the_positions_that_predict_the_completion() -> None:
    model = tiny_llama()
    heads: list[torch.Tensor] = []
    model.lm_head.register_forward_hook(lambda module, args, out: heads.append(args[0].detach()))
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11],
                              [0, 0, 12, 13, 14, 15, 0]])  # row 1: a 2-token answer, then padding
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                                   [0, 0, 1, 1, 1, 1, 0]])
    logp = grpo.completion_logprobs(model, input_ids, attention_mask, 3)
    # of the 2 x 7 positions (hidden size 32): the 3 + 2 that predict an answer token, not the
    # prompts, the last position, nor row 1's padding
    assert [tuple(h.shape) for h in heads] == [(1, 5, 32)]
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(heads[0][0], torch.cat([hidden[0, 3:6], hidden[1, 3:5]]))
    # row 1's padding reads its prompt's last position, as a packed answer's padding does
    first = torch.log_softmax(model.lm_head(hidden[1, 3]).float(), -1)  # [V]
    assert logp[1, 2].item() == pytest.approx(first[input_ids[1, 6]].item(), abs=1e-5)


class _ManualHead(torch.nn.Module):
    """A causal LM whose logits do not come from its head module: nothing to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.inner.lm_head

    def forward(self, **inputs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        keep = inputs.pop("logits_to_keep")
        hidden = self.inner.model(**inputs).last_hidden_state[:, -keep:]  # [B, K, H]
        return CausalLMOutput(logits=hidden @ self.inner.lm_head.weight.T)  # [B, K, V]


def test_a_model_whose_head_is_not_its_module_keeps_its_logits() -> None:
    manual = _ManualHead()
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [0, 0, 12, 13, 14, 15, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]])
    hooked = grpo.completion_logprobs(manual.inner, input_ids, attention_mask, 3)
    unhooked = grpo.completion_logprobs(manual, input_ids, attention_mask, 3)
    real = attention_mask[:, -3:].bool()
    torch.testing.assert_close(unhooked[real], hooked[real], atol=1e-5, rtol=0)


def test_left_padding_does_not_change_completion_logprobs() -> None:
    model = tiny_llama()  # rotary embeddings: only relative positions matter
    padded = grpo.completion_logprobs(model, torch.tensor([[0, 0, 12, 13, 14, 15, 16]]),
                                      torch.tensor([[0, 0, 1, 1, 1, 1, 1]]), 3)
    unpadded = grpo.completion_logprobs(model, torch.tensor([[12, 13, 14, 15, 16]]), torch.ones(1, 5), 3)
    torch.testing.assert_close(padded, unpadded, atol=1e-5, rtol=0)


def test_completion_logprobs_is_differentiable() -> None:
    model = tiny_llama()
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])
    logp = grpo.completion_logprobs(model, input_ids, torch.ones_like(input_ids), 2)
    assert logp.requires_grad
    logp.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_completion_length_is_checked() -> None:
    model = tiny_llama()
    input_ids = torch.tensor([[1, 2, 3]])
    for bad in (0, 3):
        with pytest.raises(ValueError, match="completion_length"):
            grpo.completion_logprobs(model, input_ids, torch.ones_like(input_ids), bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_token_logprobs_cuda_bf16_matches_naive() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4, 256, 32000, generator=gen, device="cuda") * 4).to(torch.bfloat16)
    labels = torch.randint(0, 32000, (4, 256), generator=gen, device="cuda")
    chunked, naive = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    out = grpo.token_logprobs(chunked, labels, chunk_size=300)
    torch.testing.assert_close(out, naive_logprobs(naive, labels), atol=1e-4, rtol=0)
    out.sum().backward()
    naive_logprobs(naive, labels).sum().backward()
    assert chunked.grad is not None and naive.grad is not None
    torch.testing.assert_close(chunked.grad.float(), naive.grad.float(), atol=1e-3, rtol=1e-2)


def test_default_chunk_size_follows_the_device() -> None:
    assert grpo.default_chunk_size(128256, "cpu") == grpo.CHUNK_BYTES_CPU // (4 * 128256)
    assert grpo.default_chunk_size(128256, "cuda") == grpo.CHUNK_BYTES_ACCELERATOR // (4 * 128256)
    assert grpo.default_chunk_size(10**9, "cpu") == 1
    logits, labels = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(grpo.token_logprobs(logits, labels), naive_logprobs(logits, labels))


# ------------------------------------------------------------- sampler IS correction

# The sampler's log-probs put the untruncated ratios exp(old - sampler) at
#   row 0: 1.5, 3.0, (9.0 padded)      row 1: 0.5, 1.0, 2.5
# so with cap 2 the weights are 1.5, 2.0 | 0.5, 1.0, 2.0 and the token losses of the fixture
# (-1.1, -1.2 | 1.6, 2.0, 2.6) become -1.65, -2.4 | 0.8, 2.0, 5.2: row sums -4.05 and 8.0.
SAMPLER_RATIOS = [[1.5, 3.0, 9.0], [0.5, 1.0, 2.5]]
SAMPLER_LOGP = OLD_LOGP - torch.tensor(SAMPLER_RATIOS).log()


def test_truncated_is_weights_and_mismatch_by_hand() -> None:
    weights, stats = grpo.sampler_mismatch(OLD_LOGP, SAMPLER_LOGP, MASK.float(), cap=2.0)
    close(weights * MASK, [[1.5, 2.0, 0.0], [0.5, 1.0, 2.0]], atol=1e-6)
    logs = [math.log(1.5), math.log(3.0), math.log(0.5), 0.0, math.log(2.5)]
    assert stats["sampler_logp_abs_diff"] == pytest.approx(sum(abs(x) for x in logs) / 5, abs=1e-6)
    assert stats["sampler_ratio_max"] == pytest.approx(3.0, abs=1e-5)  # 9.0 is padding
    assert stats["sampler_is_weight_mean"] == pytest.approx((1.5 + 2 + 0.5 + 1 + 2) / 5, abs=1e-6)
    assert stats["sampler_is_clipped_frac"] == pytest.approx(2 / 5)  # 3.0 and 2.5 are above the cap


def test_is_correction_weights_each_tokens_policy_term() -> None:
    close(loss_of("grpo", sampler_logp=SAMPLER_LOGP, is_cap=2.0)[0], (-4.05 / 2 + 8.0 / 3) / 2, atol=1e-5)
    close(loss_of("bnpo", sampler_logp=SAMPLER_LOGP, is_cap=2.0)[0], (-4.05 + 8.0) / 5, atol=1e-5)


def test_sampler_logprobs_without_a_cap_only_measure() -> None:
    plain, _ = loss_of("grpo")
    measured, stats = loss_of("grpo", sampler_logp=SAMPLER_LOGP)
    assert torch.equal(plain, measured)
    assert stats["sampler_ratio_max"] == pytest.approx(3.0, abs=1e-5)
    assert stats["sampler_is_weight_mean"] == 1.0 and stats["sampler_is_clipped_frac"] == 0.0


def test_is_correction_leaves_the_kl_term_unweighted() -> None:
    ref = OLD_LOGP + 0.3  # KL_t > 0 on every token
    kl_alone = loss_of("bnpo", ref_logp=ref, beta=0.5)[0] - loss_of("bnpo")[0]
    with_is = loss_of("bnpo", ref_logp=ref, beta=0.5, sampler_logp=SAMPLER_LOGP, is_cap=2.0)[0]
    close(with_is - loss_of("bnpo", sampler_logp=SAMPLER_LOGP, is_cap=2.0)[0], float(kl_alone), atol=1e-6)


def test_gspo_weights_a_sequence_by_its_tokens_geometric_mean() -> None:
    # row 0: objective 1.2 (clipped), weight sqrt(1.5 * 2.0) = sqrt(3); row 1: -2 s1, weight
    # (0.5 * 1.0 * 2.0) ** (1/3) = 1
    s1 = 0.65 ** (1 / 3)
    loss, _ = loss_of("gspo", sampler_logp=SAMPLER_LOGP, is_cap=2.0)
    close(loss, -(1.2 * math.sqrt(3.0) - 2 * s1) / 2, atol=1e-5)


def test_is_cap_needs_sampler_logprobs_and_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="is_cap"):
        loss_of("grpo", is_cap=2.0)
    with pytest.raises(ValueError, match="is_cap"):
        loss_of("grpo", sampler_logp=SAMPLER_LOGP, is_cap=0.5)
    with pytest.raises(ValueError, match="sampler_logp shape"):
        loss_of("grpo", sampler_logp=SAMPLER_LOGP[:, :2])
    with pytest.raises(ConfigError, match="sampler_is_cap"):
        GRPOConfig(sampler_is_cap=0.9).validate("grpo")
