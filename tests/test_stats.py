"""eval.stats against hand-computed values, plus eval.metrics' KL and perplexity on cases
small enough to compute by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from eval.metrics import kl_per_token, score
from eval.stats import kl_summary, paired_accuracy, perplexity_ratio_ci


# --- eval.metrics -----------------------------------------------------------------------


def test_kl_per_token_known_distributions():
    lg = lambda rows: torch.tensor(rows, dtype=torch.float64).log()  # noqa: E731
    # KL(P || Q), P = (1/2, 1/2), Q = (1/4, 3/4): 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.14384103622589042
    assert kl_per_token(lg([[0.5, 0.5]]), lg([[0.25, 0.75]])).item() == pytest.approx(0.14384103622589042, rel=1e-12)
    # and reversed: 1/4 ln(1/2) + 3/4 ln(3/2) = 0.13081203594113697 (KL is not symmetric)
    assert kl_per_token(lg([[0.25, 0.75]]), lg([[0.5, 0.5]])).item() == pytest.approx(0.13081203594113697, rel=1e-12)
    # P = (1/2, 1/4, 1/4), Q uniform: 1/2 ln(3/2) + 2 * 1/4 ln(3/4) = 1/2 ln(9/8) = 0.05889151782819173;
    # a second row with P = Q gives 0
    u = [1 / 3, 1 / 3, 1 / 3]
    kl = kl_per_token(lg([[0.5, 0.25, 0.25], u]), lg([u, u]))
    assert kl.shape == (2,) and kl[0].item() == pytest.approx(0.05889151782819173, rel=1e-12) and kl[1].item() == 0.0


class FixedLogits(torch.nn.Module):
    """A fake causal LM: position t of any input gets logits ``table[t]`` (``[L, V]``)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table, requires_grad=False)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[None, : input_ids.shape[1]].clone())  # fresh, as a model's


# next-token distributions at positions 0..2 of a 4-token window, vocab 3
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]])


def test_score_perplexity_and_kl_on_fixed_logits():
    wins = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    # targets [1, 2, 1]: p = 0.25, 0.5, 0.8 (product 0.1); targets [2, 0, 1]: p = 0.25, 0.2, 0.8 (product 0.04)
    # perplexity = exp(mean NLL) = (0.1 * 0.04) ** (-1/6) = 0.004 ** (-1/6) = 2.509901442183411
    ref_model = FixedLogits(PROBS.log())
    # the variant is scored in lockstep with the reference, window by window
    r = score(ref_model, wins)
    assert r["tokens"] == 6
    assert r["perplexity"] == pytest.approx(2.509901442183411, rel=1e-6)
    assert r["nll_mean"] == pytest.approx(-math.log(0.004) / 6, rel=1e-6)
    # a uniform variant: per position KL(P || U) = ln 3 - H(P); rows 0..2:
    # ln3 - 1.0397207708399179, ln3 - 1.0296530140645737, ln3 - 0.639031859650177
    v = score(FixedLogits(torch.zeros(4, 3)), wins, ref=ref_model)
    want = np.tile([0.05889151782819191, 0.06895927460353612, 0.45958042901793283], 2)
    np.testing.assert_allclose(v["kl_per_token"], want, rtol=1e-5)
    assert v["kl_divergence"] == pytest.approx(want.mean(), rel=1e-5)
    assert v["perplexity"] == pytest.approx(3.0, rel=1e-6)
    if "nll_per_window" in r:  # per-window sums feed perplexity_ratio_ci: -ln 0.1, -ln 0.04 nats
        np.testing.assert_allclose(r["nll_per_window"], [2.3025850929940455, 3.2188758248682006], rtol=1e-6)
        ratio = perplexity_ratio_ci(r["nll_per_window"], v["nll_per_window"], 3)["ratio"]
        assert ratio == pytest.approx(3.0 / 2.509901442183411, rel=1e-6)
    np.testing.assert_allclose(v["ref_nll_per_window"], r["nll_per_window"], rtol=1e-12)


# --- perplexity_ratio_ci ------------------------------------------------------------------


def test_ratio_hand_computed():
    r = perplexity_ratio_ci(np.array([10.0, 20.0]), np.array([12.0, 21.0]), 10)
    assert r["ratio"] == pytest.approx(math.exp(3 / 20), rel=1e-12)
    assert r["n_windows"] == 2 and r["method"] == "paired bootstrap over windows"
    # two windows, diffs 2 and 1, 10 tokens each: resamples give exp(0.2), exp(0.15) or exp(0.1)
    assert r["ci_low"] == pytest.approx(math.exp(0.1)) and r["ci_high"] == pytest.approx(math.exp(0.2))
    r = perplexity_ratio_ci([10.0, 20.0], [12.0, 21.0], np.array([5, 15]))
    assert r["ratio"] == pytest.approx(math.exp(3 / 20), rel=1e-12)


def test_one_window_has_no_interval():
    r = perplexity_ratio_ci([5.0], [6.0], 4)
    assert r["ratio"] == pytest.approx(math.exp(0.25)) and r["ci_low"] is None and r["ci_high"] is None


@pytest.mark.parametrize("args", [([1.0, 2.0], [1.0], 3), ([], [], 3), ([1.0], [np.nan], 3), ([1.0], [1.0], 0)])
def test_ratio_bad_input(args):
    with pytest.raises(ValueError):
        perplexity_ratio_ci(*args)


def _synthetic(seed: int, n: int, t: int = 64, mu: float = 0.05):
    """Windows of ``t`` tokens; per-token NLL difference (variant - reference) = a per-window
    effect N(0, 0.1) + token noise N(0, 0.5), population mean ``mu`` -> true ratio exp(mu)."""
    rng = np.random.default_rng(1000 + seed)
    ref = rng.gamma(2.0, 1.5, size=(n, t)).sum(1)
    var = ref + t * rng.normal(0, 0.1, size=n) + rng.normal(mu, 0.5, size=(n, t)).sum(1)
    return ref, var, t


def test_bootstrap_covers_true_ratio():
    hits = 0
    for s in range(100):
        r = perplexity_ratio_ci(*_synthetic(s, 40), n_boot=1000, seed=s)
        hits += r["ci_low"] <= math.exp(0.05) <= r["ci_high"]
    assert hits >= 90, hits


def test_bootstrap_interval_shrinks_with_more_windows():
    def width(n):
        r = perplexity_ratio_ci(*_synthetic(0, n), n_boot=1000)
        return r["ci_high"] - r["ci_low"]

    w20, w500 = width(20), width(500)
    assert w500 < 0.5 * w20, (w20, w500)  # ~ sqrt(20/500) = 0.2 expected


# --- paired_accuracy -----------------------------------------------------------------------


def test_mcnemar_hand_computed():
    # 6 discordant pairs, all ref-only: p = 2 * 0.5**6 = 0.03125
    ref = [1] * 6 + [1, 1, 0, 0]
    var = [0] * 6 + [1, 1, 0, 0]
    r = paired_accuracy(ref, var)
    assert r["p_value"] == pytest.approx(0.03125, rel=1e-12) and r["significant"] is True
    assert (r["ref_only"], r["var_only"], r["n"]) == (6, 0, 10)
    assert r["acc_ref"] == 0.8 and r["acc_var"] == 0.2 and r["delta"] == pytest.approx(-0.6)
    assert r["method"] == "exact McNemar"
    # 1 vs 4 discordant: p = 2 * (C(5,0) + C(5,1)) / 2**5 = 12 / 32 = 0.375
    r = paired_accuracy([1, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1])
    assert r["p_value"] == pytest.approx(0.375, rel=1e-12) and r["significant"] is False


def test_mcnemar_identical_and_errors():
    r = paired_accuracy([1, 0, 1], [1, 0, 1])
    assert r["p_value"] == 1.0 and r["delta"] == 0.0 and r["significant"] is False
    with pytest.raises(ValueError, match="same items"):
        paired_accuracy([1, 0], [1])
    with pytest.raises(ValueError):
        paired_accuracy([2], [1])


def test_kl_summary():
    k = np.arange(101, dtype=np.float64)  # 0..100: p99 = 99 by linear interpolation
    assert kl_summary(k) == {"mean": 50.0, "median": 50.0, "p99": 99.0, "max": 100.0}
    with pytest.raises(ValueError):
        kl_summary(np.array([]))


def test_reference_cache_runs_the_reference_once_when_it_fits():
    from eval.metrics import ReferenceCache

    class Counting(FixedLogits):
        calls = 0

        def forward(self, input_ids):
            Counting.calls += 1
            return super().forward(input_ids)

    wins = torch.tensor([[0, 1, 2, 1], [2, 2, 0, 1]])
    ref = ReferenceCache(Counting(PROBS.log()), budget_bytes=10**6)
    a = score(ref, wins)
    b = score(FixedLogits(torch.zeros(4, 3)), wins, ref=ref)
    assert Counting.calls == 2 and ref.complete  # two windows, computed once
    np.testing.assert_allclose(b["ref_nll_per_window"], a["nll_per_window"], rtol=0)
    small = ReferenceCache(Counting(PROBS.log()), budget_bytes=10)  # 2 x 3 x 3 x 4 bytes do not fit
    score(small, wins)
    score(FixedLogits(torch.zeros(4, 3)), wins, ref=small)
    assert Counting.calls == 6 and not small.complete  # recomputed in lockstep
