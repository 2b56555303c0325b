"""Quality metrics of a model variant against the reference (4-bit base + unmerged adapter).

Perplexity protocol: the token stream is cut into non-overlapping windows of
``seq_len`` tokens (stride = ``seq_len``, the last partial window dropped); each window
is scored independently, so every token but the first of each window is predicted
from at most ``seq_len - 1`` tokens of context; ``seq_len - 1`` tokens are counted per
window. Perplexity is ``exp(mean NLL)`` over all counted tokens.

KL divergence is ``KL(P_ref || P_variant) = sum_v p_ref(v) (log p_ref(v) - log p_var(v))``
per predicted token, in nats, as in llama.cpp's ``perplexity --kl-divergence``.
Top-1 agreement is the fraction of predicted tokens whose argmax matches the reference's.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch


@torch.no_grad()
def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[seq_len - 1, vocab]`` (float32) of the next token at each position
    of one window ``[seq_len]`` (int64), predicting tokens 1..seq_len-1.

    Computed in place on the model's fresh logits (one ``[seq_len, vocab]`` buffer, not three: a
    262144-token vocabulary makes each 0.5 GB at 512 tokens)."""
    from pipeline.layerwise import logprobs_from_logits

    dev = next(model.parameters()).device
    return logprobs_from_logits(model(input_ids=window[None].to(dev)).logits[0, :-1])


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor, rows: int = 16) -> torch.Tensor:
    """``KL(P_ref || P)`` per row, in nats (float64 accumulation); inputs ``[T, V]`` log-probs.

    Vocabularies of different sizes are compared on the common prefix of token ids. Computed
    ``rows`` rows at a time (each row's sum is the same): the float64 temporaries of a whole
    window are ~7 x T x V x 8 bytes, 3.7 GB for 511 tokens of a 128256-token vocabulary.
    """
    v = min(ref_logp.shape[-1], logp.shape[-1])
    out = torch.empty(ref_logp.shape[0], dtype=torch.float64)
    for i in range(0, ref_logp.shape[0], rows):
        r, q = ref_logp[i : i + rows, :v].double(), logp[i : i + rows, :v].double()
        p = r.exp()
        terms = torch.where(p == 0, torch.zeros_like(p), p * (r - q))  # 0 * log 0 = 0; NaN stays NaN
        out[i : i + rows] = terms.sum(-1)
    return out.clamp_min(0.0)


def logprob_stream(model, wins: torch.Tensor) -> Iterator[torch.Tensor]:
    """Per-window log-probs ``[seq_len - 1, vocab]`` of ``model`` on ``wins``: a whole model window
    by window, or a model run one decoder layer at a time (anything with ``iter_logprobs``)."""
    if hasattr(model, "iter_logprobs"):
        yield from model.iter_logprobs(wins)
    else:
        for w in wins:
            yield window_logprobs(model, w)


class ReferenceCache:
    """The reference as a scoring source that keeps its per-window log-probs in memory (float32,
    exact) once computed, when they fit in ``budget_bytes``; otherwise every use recomputes them
    in lockstep with the variant. So the reference's forward runs once for small vocabularies x
    token counts (the demo: 4096 tokens x 49152 = 0.8 GB) and memory stays bounded for large ones
    (a 262144 vocabulary over 4096 tokens would take 4.3 GB: recomputed instead).

    Use one cache per set of windows.
    """

    def __init__(self, model, budget_bytes: int = 10**9):
        self.model, self.budget = model, budget_bytes
        self.cache: list[torch.Tensor] | None = None
        self.fits: bool | None = None

    def iter_logprobs(self, wins: torch.Tensor) -> Iterator[torch.Tensor]:
        if self.cache is not None:
            yield from self.cache
            return
        kept: list[torch.Tensor] = []
        for lp in logprob_stream(self.model, wins):
            if self.fits is None:
                self.fits = len(wins) * lp.numel() * lp.element_size() <= self.budget
            if self.fits:
                kept.append(lp)
            yield lp
        if self.fits:
            self.cache = kept

    @property
    def complete(self) -> bool:
        """Whether every window is cached (the model itself is then no longer needed)."""
        return self.cache is not None


def score(model, wins: torch.Tensor, ref=None, progress: str | None = None) -> dict:
    """Score one model on windows ``[n, seq_len]``: perplexity, and against the reference ``ref``
    (another model, run in lockstep window by window) KL and top-1 agreement.

    Lockstep: both distributions of a window are in memory only while that window is scored,
    so memory does not grow with vocabulary x tokens and nothing is stored on disk.

    Returns:
        A :class:`pipeline.records.Score`: ``perplexity``, ``nll_mean`` (nats/token), ``tokens``
        (counted), ``nll_per_window`` (numpy float64 [n], summed NLL of each window, nats),
        ``seconds``, ``tokens_per_second`` and, with ``ref``: ``kl_divergence`` (mean,
        nats/token), ``kl_median``, ``kl_p99``, ``kl_max``, ``top1_agreement`` (fraction),
        ``kl_per_token`` (numpy float64 array), ``top1_per_window`` (agreeing tokens per window),
        ``ref_nll_per_window``; ``nonfinite``: windows
        whose log-probs (this model's, or the reference's) hold inf/NaN; ``ref_nonfinite``: those
        where the reference's do.
    """
    import time

    from tqdm import tqdm

    t0 = time.perf_counter()
    nll_sum, count, kls, agree, per_window, ref_window, nonfinite, ref_nonfinite = 0.0, 0, [], 0, [], [], 0, 0
    agree_window = []
    refs = logprob_stream(ref, wins) if ref is not None else None
    it = tqdm(
        logprob_stream(model, wins), total=len(wins), desc=progress, unit="win", disable=progress is None, leave=False
    )
    for i, logp in enumerate(it):
        bad = bool(torch.isnan(logp).any())  # inf/NaN logits give NaN log-probs
        tgt = wins[i, 1:]
        per_window.append(-logp.gather(1, tgt[:, None]).double().sum().item())
        nll_sum += per_window[-1]
        count += len(tgt)
        if refs is not None:
            r = next(refs)
            ref_bad = bool(torch.isnan(r).any())
            ref_nonfinite += ref_bad
            bad = bad or ref_bad
            ref_window.append(-r.gather(1, tgt[:, None]).double().sum().item())
            kls.append(kl_per_token(r, logp).numpy())
            agree_window.append((r.argmax(-1) == logp.argmax(-1)).sum().item())
            agree += agree_window[-1]
            del r
        nonfinite += bad
        del logp
    mean = nll_sum / count
    seconds = time.perf_counter() - t0
    out = {
        "nll_mean": mean,
        "perplexity": math.exp(mean) if mean == mean and mean < 700 else float("inf"),
        "tokens": count,
        "nll_per_window": np.array(per_window),
        "nonfinite": nonfinite,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(count / max(seconds, 1e-9), 1),
    }
    if refs is not None:
        from eval.stats import kl_summary

        k = np.concatenate(kls)
        ks = kl_summary(k)
        out.update(
            kl_divergence=ks["mean"],
            kl_median=ks["median"],
            kl_p99=ks["p99"],
            kl_max=ks["max"],
            top1_agreement=agree / count,
            top1_per_window=np.array(agree_window),
            kl_per_token=k,
            ref_nll_per_window=np.array(ref_window),
            ref_nonfinite=ref_nonfinite,
        )
    return out
