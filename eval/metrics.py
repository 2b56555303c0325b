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

from pipeline.common import release_freed_memory

ROWS = 64  # predicted positions per block of log-probs: 64 x 262144 x 4 bytes = 67 MB


@torch.no_grad()
def window_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[seq_len - 1, vocab]`` (float32) of the next token at each position
    of one window ``[seq_len]`` (int64), predicting tokens 1..seq_len-1 (the blocks of
    :func:`window_blocks` put together)."""
    return torch.cat(list(window_blocks(model, window, rows=window.numel())))


def _post_head(config, logits: torch.Tensor) -> torch.Tensor:
    """What causal LMs in transformers do to the head's output before returning it: Cohere's
    ``logit_scale``, Granite's ``logits_scaling``, Gemma's ``final_logit_softcapping``. A model
    that does anything else is caught by the first-row check in :func:`window_blocks`."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if (scale := getattr(c, "logit_scale", None)) is not None and not isinstance(scale, bool):
        logits = logits * scale
    if scale := getattr(c, "logits_scaling", None):
        logits = logits / scale
    if cap := getattr(c, "final_logit_softcapping", None):
        logits = torch.tanh(logits / cap) * cap
    return logits


def _slices(logp: torch.Tensor, rows: int) -> Iterator[torch.Tensor]:
    for i in range(0, logp.shape[0], rows):
        yield logp[i : i + rows]


def _first_row(h: torch.Tensor) -> torch.Tensor:
    """``h[:, :1]`` ``[batch, 1, hidden]`` copied to standard strides. The slice keeps the window's
    strides, and a bf16 ``F.linear`` on CPU given such a 3-D input copies the whole weight first
    (torch 2.13: 0.31 GB for a 262144 x 640 head, once per window); the copy holds the same values."""
    return h[:, :1].clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def window_blocks(model, window: torch.Tensor, rows: int = ROWS) -> Iterator[torch.Tensor]:
    """Log-probabilities of one window ``[seq_len]`` (int64), ``rows`` predicted positions at a
    time: float32 ``[<= rows, vocab]`` blocks, in order, together ``[seq_len - 1, vocab]``.

    The decoder runs once; the output embedding (the head) is then applied to ``rows`` hidden
    states at a time, so a window's logits are never whole in memory (a 262144-token
    vocabulary makes them 0.5 GB per model at 512 tokens, three times that with the
    log-softmax's temporaries). The model's own forward computes the first row's logits; the
    blocks are used only if the head and :func:`_post_head` reproduce that row exactly, otherwise
    (a head not called as a module, other post-processing) the model's full logits are used.
    """
    from pipeline.layerwise import logprobs_from_logits

    dev = next(model.parameters()).device
    ids = window[None].to(dev)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen: dict = {}

    def first_row_only(mod, args):  # the forward's head sees every position; keep the first
        if "h" in seen or not args or args[0].dim() != 3 or args[0].shape[1] != ids.shape[1]:
            return None
        seen["h"] = args[0]
        return (_first_row(args[0]),) + tuple(args[1:])

    handle = head.register_forward_pre_hook(first_row_only) if isinstance(head, torch.nn.Module) else None
    try:
        logits = model(input_ids=ids).logits
    finally:
        if handle is not None:
            handle.remove()
    h = seen.get("h")
    if h is not None:  # the head ran on the first row only
        config = getattr(model, "config", None)
        mine = _post_head(config, head(_first_row(h))) if config is not None else None
        if mine is not None and logits.shape == mine.shape and torch.equal(mine.to(logits.dtype), logits):
            del logits, mine
            n = ids.shape[1] - 1
            for i in range(0, n, rows):
                yield logprobs_from_logits(_post_head(config, head(h[0, i : min(i + rows, n)])))
            return
        del h, seen["h"]
        logits = model(input_ids=ids).logits  # the decomposition does not hold for this model
    yield from _slices(logprobs_from_logits(logits[0, :-1]), rows)


def kl_per_token(ref_logp: torch.Tensor, logp: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """``KL(P_ref || P)`` per row, in nats (float64 accumulation); inputs ``[T, V]`` log-probs.

    Vocabularies of different sizes are compared on the common prefix of token ids. Computed
    ``rows`` rows at a time (each row's sum is the same) in three float64 buffers of
    ``rows x V`` (the terms in place), 50 MB at a 262144-token vocabulary; a whole window's
    temporaries would be ~7 x T x V x 8 bytes, 3.7 GB for 511 tokens of a 128256-token vocabulary.
    """
    v = min(ref_logp.shape[-1], logp.shape[-1])
    out = torch.empty(ref_logp.shape[0], dtype=torch.float64)
    for i in range(0, ref_logp.shape[0], rows):
        r = ref_logp[i : i + rows, :v].double()
        p = r.exp()
        terms = r.sub_(logp[i : i + rows, :v].double()).mul_(p)  # p * (r - q), in r's buffer
        terms.masked_fill_(p == 0, 0.0)  # 0 * log 0 = 0; NaN stays NaN
        out[i : i + rows] = terms.sum(-1)
        del r, p, terms
    return out.clamp_min(0.0)


def logprob_stream(model, wins: torch.Tensor, rows: int = ROWS) -> Iterator[Iterator[torch.Tensor]]:
    """Per window, the log-probs ``[seq_len - 1, vocab]`` of ``model`` on ``wins`` as an iterator
    of ``rows``-row blocks (:func:`window_blocks`): a whole model window by window, or a model run
    one decoder layer at a time (anything with ``iter_logprobs``, whose windows are sliced), or a
    :class:`ReferenceCache`."""
    if hasattr(model, "iter_blocks"):
        yield from model.iter_blocks(wins, rows)
    elif hasattr(model, "iter_logprobs"):
        for lp in model.iter_logprobs(wins):
            yield _slices(lp, rows)
    else:
        for w in wins:
            yield window_blocks(model, w, rows)


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
        self.cache: list[list[torch.Tensor]] | None = None
        self.fits: bool | None = None

    def iter_blocks(self, wins: torch.Tensor, rows: int = ROWS) -> Iterator[Iterator[torch.Tensor]]:
        """Like :func:`logprob_stream` on the reference (from memory once cached)."""
        if self.cache is not None:
            for blocks in self.cache:
                yield iter(blocks)
            return
        if self.fits is None and (vocab := _vocab(self.model)) is not None:
            self.fits = wins.numel() * vocab * 4 <= self.budget
        if self.fits is False:
            yield from logprob_stream(self.model, wins, rows)
            return
        kept: list[list[torch.Tensor]] = []
        for blocks in logprob_stream(self.model, wins, rows):
            if self.fits is None:  # vocabulary unknown: measured on the first window
                first = list(blocks)
                self.fits = len(wins) * sum(b.numel() * b.element_size() for b in first) <= self.budget
                blocks = iter(first)
            if self.fits:
                kept.append(list(blocks))
                yield iter(kept[-1])
            else:
                yield blocks
        if self.fits:
            self.cache = kept

    @property
    def complete(self) -> bool:
        """Whether every window is cached (the model itself is then no longer needed)."""
        return self.cache is not None


def _vocab(model) -> int | None:
    """Vocabulary size of a model (whole, PEFT-wrapped or layer-wise), or None."""
    for m in (model, getattr(model, "model", None)):
        c = getattr(m, "config", None)
        if c is not None:
            c = c.get_text_config() if hasattr(c, "get_text_config") else c
            if getattr(c, "vocab_size", None):
                return int(c.vocab_size)
    return getattr(model, "vocab", None)


def score(model, wins: torch.Tensor, ref=None, progress: str | None = None, rows: int = ROWS) -> dict:
    """Score one model on windows ``[n, seq_len]``: perplexity, and against the reference ``ref``
    (another model, run in lockstep window by window) KL and top-1 agreement.

    Lockstep: both distributions of a window are in memory only while that window is scored,
    ``rows`` positions at a time (:func:`window_blocks`), so memory does not grow with
    vocabulary x tokens and nothing is stored on disk.

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
    refs = logprob_stream(ref, wins, rows) if ref is not None else None
    it = tqdm(
        logprob_stream(model, wins, rows),
        total=len(wins),
        desc=progress,
        unit="win",
        disable=progress is None,
        leave=False,
    )
    for i, blocks in enumerate(it):
        rblocks = next(refs) if refs is not None else None
        tgt_all = wins[i, 1:]
        bad = ref_bad = False
        nll_w = ref_nll_w = 0.0
        agree_w, pos = 0, 0
        for logp in blocks:  # rows of the window in order, both models in lockstep
            tgt = tgt_all[pos : pos + logp.shape[0]]
            pos += logp.shape[0]
            bad = bad or bool(torch.isnan(logp).any())  # inf/NaN logits give NaN log-probs
            nll_w += -logp.gather(1, tgt[:, None]).double().sum().item()
            if rblocks is not None:
                r = next(rblocks)
                if r.shape[0] != logp.shape[0]:
                    raise ValueError(f"reference block of {r.shape[0]} rows against {logp.shape[0]} (window {i})")
                ref_bad = ref_bad or bool(torch.isnan(r).any())
                ref_nll_w += -r.gather(1, tgt[:, None]).double().sum().item()
                kls.append(kl_per_token(r, logp).numpy())
                agree_w += (r.argmax(-1) == logp.argmax(-1)).sum().item()
                del r
            del logp
        if pos != len(tgt_all):
            raise ValueError(f"window {i}: log-probs for {pos} positions, expected {len(tgt_all)}")
        per_window.append(nll_w)
        nll_sum += nll_w
        count += len(tgt_all)
        if rblocks is not None:
            ref_nonfinite += ref_bad
            bad = bad or ref_bad
            ref_window.append(ref_nll_w)
            agree_window.append(agree_w)
            agree += agree_w
        nonfinite += bad
        release_freed_memory()  # the window's blocks, freed into the heap, back to the system
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
