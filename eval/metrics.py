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
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[seq_len - 1, vocab]`` (float32) of the next token at each position
    of one window ``[seq_len]`` (int64), predicting tokens 1..seq_len-1."""
    dev = next(model.parameters()).device
    logits = model(input_ids=window[None].to(dev)).logits[0, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(P_ref || P)`` per row, in nats (float64 accumulation); inputs ``[T, V]`` log-probs.

    Vocabularies of different sizes are compared on the common prefix of token ids.
    """
    v = min(ref_logp.shape[-1], logp.shape[-1])
    r, q = ref_logp[:, :v].double(), logp[:, :v].double()
    p = r.exp()
    terms = torch.where(p == 0, torch.zeros_like(p), p * (r - q))  # 0 * log 0 = 0; NaN stays NaN
    return terms.sum(-1).clamp_min(0.0)


class ReferenceStore:
    """The reference's log-probs for every window, on disk (float32 memmap), so that each
    variant can be scored later without holding two models in memory.

    Size: ``n_windows * (seq_len - 1) * vocab * 4`` bytes (2k tokens x 49k vocab: 0.4 GB).
    """

    def __init__(self, n_windows: int, seq_len: int, vocab: int, folder: str | Path | None = None):
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)
        self.vocab = vocab
        self._tmp = tempfile.TemporaryDirectory(dir=folder, prefix="reference-logprobs-")
        self.arr = np.lib.format.open_memmap(
            Path(self._tmp.name) / "logp.npy", mode="w+", dtype=np.float32, shape=(n_windows, seq_len - 1, vocab)
        )

    def __enter__(self) -> "ReferenceStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def put(self, i: int, logp: torch.Tensor) -> None:
        self.arr[i] = logp.numpy()

    def get(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.arr[i]))

    def close(self) -> None:
        if hasattr(self, "arr"):
            del self.arr
            self._tmp.cleanup()


def score(
    model,
    wins: torch.Tensor,
    ref: ReferenceStore | None = None,
    store: ReferenceStore | None = None,
    progress: str | None = None,
) -> dict:
    """Score one model on windows ``[n, seq_len]``: perplexity, and against ``ref`` KL and top-1.

    ``store`` (when given) receives this model's log-probs (use it for the reference).

    Returns:
        dict with ``perplexity``, ``nll_mean`` (nats/token), ``tokens`` (counted),
        ``nll_per_window`` (numpy float64 [n], summed NLL of each window, nats),
        and with ``ref``: ``kl_divergence`` (mean, nats/token), ``kl_median``, ``kl_p99``,
        ``kl_max``, ``top1_agreement`` (fraction), ``kl_per_token`` (numpy float64 array);
        ``nonfinite``: windows whose log-probs (this model's, or the reference's) hold inf/NaN.
    """
    from tqdm import tqdm

    nll_sum, count, kls, agree, per_window, nonfinite = 0.0, 0, [], 0, [], 0
    it = tqdm(range(len(wins)), desc=progress, unit="win", disable=progress is None, leave=False)
    for i in it:
        logp = window_logprobs(model, wins[i])
        bad = bool(torch.isnan(logp).any())  # inf/NaN logits give NaN log-probs
        tgt = wins[i, 1:]
        per_window.append(-logp.gather(1, tgt[:, None]).double().sum().item())
        nll_sum += per_window[-1]
        count += len(tgt)
        if store is not None:
            store.put(i, logp)
        if ref is not None:
            r = ref.get(i)
            bad = bad or bool(torch.isnan(r).any())
            kls.append(kl_per_token(r, logp).numpy())
            agree += (r.argmax(-1) == logp.argmax(-1)).sum().item()
        nonfinite += bad
    mean = nll_sum / count
    out = {
        "nll_mean": mean,
        "perplexity": math.exp(mean) if mean == mean and mean < 700 else float("inf"),
        "tokens": count,
        "nll_per_window": np.array(per_window),
        "nonfinite": nonfinite,
    }
    if ref is not None:
        from eval.stats import kl_summary

        k = np.concatenate(kls)
        ks = kl_summary(k)
        out.update(
            kl_divergence=ks["mean"],
            kl_median=ks["median"],
            kl_p99=ks["p99"],
            kl_max=ks["max"],
            top1_agreement=agree / count,
            kl_per_token=k,
        )
    return out
