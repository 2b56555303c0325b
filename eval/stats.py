"""Uncertainty for the quality-loss numbers: is a variant's loss against the reference real
or within the noise of a finite evaluation set?

- Perplexity ratio with a paired bootstrap CI over windows (Efron & Tibshirani, *An
  Introduction to the Bootstrap*, 1993, ch. 13, percentile interval). Windows, not tokens,
  are resampled: tokens inside a window are correlated, windows are scored independently
  (see ``eval.metrics``), and both models are scored on the same windows, so resampling the
  same window indices for both keeps the pairing.
- Paired accuracy with the exact McNemar test (McNemar 1947; exact form: a two-sided
  binomial test of the discordant pairs against p = 0.5, e.g. Fagerland et al. 2013,
  BMC Med. Res. Methodol. 13:91), via ``scipy.stats.binomtest``.
- KL summary statistics of a per-token KL array (as ``eval.metrics.score`` reports them).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest


def perplexity_ratio_ci(
    nll_ref: np.ndarray,
    nll_var: np.ndarray,
    tokens_per_window: int | np.ndarray,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """``ppl_var / ppl_ref`` on the same windows, with a paired bootstrap percentile CI.

    Args:
        nll_ref, nll_var: per-window summed NLL in nats, shape ``[n_windows]`` (float), window i
            of both arrays being the same text.
        tokens_per_window: predicted tokens per window (int, or int array ``[n_windows]``), > 0.
        n_boot: bootstrap resamples; alpha: two-sided level (CI at ``1 - alpha``); seed: RNG seed.

    Returns:
        ``{"ratio", "ci_low", "ci_high", "n_windows", "n_boot", "alpha", "method"}`` where
        ``ratio = exp((sum(nll_var) - sum(nll_ref)) / sum(tokens))``; with one window the CI
        bounds are ``None`` (nothing to resample).

    Raises:
        ValueError: shapes differ or are not 1-D, no windows, non-finite NLL, tokens <= 0,
            ``alpha`` outside (0, 1), ``n_boot`` < 1.
    """
    ref, var = np.asarray(nll_ref, dtype=np.float64), np.asarray(nll_var, dtype=np.float64)
    if ref.ndim != 1 or ref.shape != var.shape:
        raise ValueError(f"nll_ref and nll_var must be 1-D of the same length, got {ref.shape} and {var.shape}")
    n = len(ref)
    if n == 0:
        raise ValueError("no windows")
    if not (np.isfinite(ref).all() and np.isfinite(var).all()):
        raise ValueError("non-finite NLL")
    tok = np.broadcast_to(np.asarray(tokens_per_window, dtype=np.float64), ref.shape)
    if (tok <= 0).any():
        raise ValueError("tokens_per_window must be > 0")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    diff = var - ref
    out = {
        "ratio": float(np.exp(diff.sum() / tok.sum())),
        "ci_low": None,
        "ci_high": None,
        "n_windows": n,
        "n_boot": n_boot,
        "alpha": alpha,
        "method": "paired bootstrap over windows",
    }
    if n > 1:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        boot = np.exp(diff[idx].sum(1) / tok[idx].sum(1))
        lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
        out.update(ci_low=float(lo), ci_high=float(hi))
    return out


def paired_accuracy(ref: list[int], var: list[int]) -> dict:
    """Accuracy of reference and variant on the same items, and the exact McNemar test.

    Args:
        ref, var: per-item correctness (0 or 1), same items in the same order.

    Returns:
        ``{"acc_ref", "acc_var", "delta" (acc_var - acc_ref), "n", "ref_only" (ref right, var
        wrong), "var_only", "p_value", "significant" (p < 0.05), "method"}``; ``p_value`` is the
        two-sided binomial test of ``ref_only`` out of ``ref_only + var_only`` at p = 0.5, and
        1.0 when there are no discordant pairs.

    Raises:
        ValueError: lengths differ, no items, or a value other than 0/1.
    """
    if len(ref) != len(var):
        raise ValueError(f"ref and var must cover the same items, got {len(ref)} and {len(var)}")
    if len(ref) == 0:
        raise ValueError("no items")
    r, v = np.asarray(ref), np.asarray(var)
    if not (np.isin(r, (0, 1)).all() and np.isin(v, (0, 1)).all()):
        raise ValueError("correctness values must be 0 or 1")
    ref_only, var_only = int(((r == 1) & (v == 0)).sum()), int(((r == 0) & (v == 1)).sum())
    disc = ref_only + var_only
    p = float(binomtest(ref_only, disc, 0.5, alternative="two-sided").pvalue) if disc else 1.0
    acc_ref, acc_var = float(r.mean()), float(v.mean())
    return {
        "acc_ref": acc_ref,
        "acc_var": acc_var,
        "delta": acc_var - acc_ref,
        "n": len(r),
        "ref_only": ref_only,
        "var_only": var_only,
        "p_value": p,
        "significant": p < 0.05,
        "method": "exact McNemar",
    }


def kl_summary(kl_per_token: np.ndarray) -> dict:
    """``{"mean", "median", "p99", "max"}`` (nats/token, floats) of a per-token KL array (any
    shape, flattened; ``eval.metrics.kl_per_token`` output). p99: numpy's default linear
    interpolation, as ``eval.metrics.score`` computes it.

    Raises:
        ValueError: empty array.
    """
    k = np.asarray(kl_per_token, dtype=np.float64).ravel()
    if k.size == 0:
        raise ValueError("empty KL array")
    return {
        "mean": float(k.mean()),
        "median": float(np.median(k)),
        "p99": float(np.percentile(k, 99)),
        "max": float(k.max()),
    }


def window_mean_ci(
    sums: np.ndarray, counts: int | np.ndarray, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict:
    """A per-token mean (KL, top-1 agreement) with a bootstrap percentile interval over windows.

    Args:
        sums: per-window sum of the per-token values, shape ``[n_windows]``; counts: tokens per
            window (int or ``[n_windows]``), > 0. Windows, not tokens, are resampled, as for
            :func:`perplexity_ratio_ci` (tokens inside a window are correlated).

    Returns:
        ``{"mean", "ci_low", "ci_high", "n_windows", "n_boot", "alpha", "method"}``; ``mean =
        sum(sums) / sum(counts)``; with one window the bounds are ``None``.

    Raises:
        ValueError: not 1-D, no windows, non-finite values, counts <= 0.
    """
    s = np.asarray(sums, dtype=np.float64)
    if s.ndim != 1 or len(s) == 0:
        raise ValueError(f"sums must be 1-D and non-empty, got shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError("non-finite values")
    c = np.broadcast_to(np.asarray(counts, dtype=np.float64), s.shape)
    if (c <= 0).any():
        raise ValueError("counts must be > 0")
    out = {
        "mean": float(s.sum() / c.sum()),
        "ci_low": None,
        "ci_high": None,
        "n_windows": len(s),
        "n_boot": n_boot,
        "alpha": alpha,
        "method": "bootstrap over windows",
    }
    if len(s) > 1:
        idx = np.random.default_rng(seed).integers(0, len(s), size=(n_boot, len(s)))
        lo, hi = np.quantile(s[idx].sum(1) / c[idx].sum(1), [alpha / 2, 1 - alpha / 2])
        out.update(ci_low=float(lo), ci_high=float(hi))
    return out
