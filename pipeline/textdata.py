"""Text sources and token windows: the embedded default corpus, local files, hub datasets,
Alpaca records; their train/held-out splits; the windows every stage scores on.

A text source (:class:`pipeline.config.TextSource`) without ``max_tokens`` takes what its use
needs (:func:`max_tokens_for`), so one default never contradicts another.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.errors import InputError

# Held-out splits: every 5th pydoc topic (sorted by name), every 10th Alpaca record. The demo's
# adapter training and the pipeline's held-out texts both use these rules.
HELDOUT_EVERY = {"embedded": 5, "alpaca": 10}


def in_split(i: int, every: int, split: str) -> bool:
    """Whether item ``i`` belongs to ``split`` (``train``, ``heldout``, ``all``) when every
    ``every``-th item (``i % every == 0``) is held out."""
    return split == "all" or (i % every == 0) == (split == "heldout")


def embedded_topics(split: str) -> list[str]:
    """Texts of CPython's ``pydoc_data.topics`` (ships with every CPython).

    Split by topic: topics are sorted by name and every fifth one (index % 5 == 0)
    is ``heldout``; the rest are ``train``; ``all`` returns both.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    return [topics[n] for i, n in enumerate(names) if in_split(i, HELDOUT_EVERY["embedded"], split)]


def alpaca_prompt(r: dict) -> str:
    """An Alpaca record rendered with the Alpaca training prompt (instruction, optional input, response)."""
    inp = f"### Input:\n{r['input']}\n\n" if r.get("input") else ""
    return f"### Instruction:\n{r['instruction']}\n\n{inp}### Response:\n{r['output']}"


def alpaca_records(path: str | Path, name: str = "text") -> list[dict]:
    """The records of an Alpaca JSON file (a list of ``{instruction, input, output}``).

    Raises:
        InputError: not JSON, or not a list of such records.
    """
    try:
        recs = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"text source '{name}': {path} is not a JSON file ({e})") from None
    if not isinstance(recs, list) or not all(isinstance(r, dict) and "instruction" in r for r in recs):
        raise InputError(f"{path}: not a JSON list of Alpaca records (instruction, input, output)")
    return recs


def load_texts(src) -> list[str]:
    """Documents of a :class:`pipeline.config.TextSource` as a list of strings.

    Raises:
        InputError: file unreadable or not UTF-8, JSONL line without ``text_field``, bad Alpaca file.
    """
    if src.source == "embedded":
        return embedded_topics(src.split)
    if src.format == "alpaca":
        recs = alpaca_records(src.path, src.name)
        return [alpaca_prompt(r) for i, r in enumerate(recs) if in_split(i, HELDOUT_EVERY["alpaca"], src.split)]
    if src.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(src.hub_name, src.hub_config, split=src.hub_split)
        except Exception as e:  # offline, missing, gated: many error types
            raise InputError(
                f"text source '{src.name}': hub dataset '{src.hub_name}' could not be loaded "
                f"({type(e).__name__}). Use a local file (source: file) offline."
            ) from None
        return [t for t in ds[src.text_field] if t and t.strip()]
    path = Path(src.path)
    try:
        return _read_file(path, src)
    except UnicodeDecodeError as e:
        raise InputError(
            f"text source '{src.name}': {path} is not UTF-8 text ({e.reason} at byte {e.start})."
        ) from None


def _read_file(path: Path, src) -> list[str]:
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[src.text_field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise InputError(f"{path}:{i + 1}: not a JSON object with field '{src.text_field}'") from None
        return docs
    return [path.read_text(encoding="utf-8")]


def max_tokens_for(src, role: str, seq_len: int, num_samples: int = 1) -> int:
    """Tokens to take from ``src`` for ``role``: its own ``max_tokens``, else what the role needs.

    ``calibration``: 4 x ``num_samples`` x ``seq_len`` (windows spread over four times the text
    they need), capped by ``max_tokens`` when set; ``verify``: max(1024, 2 x ``seq_len``);
    ``eval``: max(4096, 8 x ``seq_len``).
    """
    if role == "calibration":
        return min(src.max_tokens or 4 * num_samples * seq_len, 4 * num_samples * seq_len)
    if src.max_tokens:
        return src.max_tokens
    return {"verify": max(1024, 2 * seq_len), "eval": max(4096, 8 * seq_len)}[role]


def token_stream(tokenizer, src, max_tokens: int) -> torch.Tensor:
    """Concatenate a corpus' documents (joined by blank lines) and tokenize once.

    Returns a 1-D ``int64`` tensor of at most ``max_tokens`` token ids, no special tokens added.
    """
    text = "\n\n".join(load_texts(src))
    # tokenise a prefix generous enough for `max_tokens` tokens (>= 1 char per token)
    ids = tokenizer(text[: max_tokens * 12], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:max_tokens]


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Cut a 1-D token stream into ``[n, seq_len]`` non-overlapping windows (int64), dropping
    the last partial window.

    Raises:
        ValueError: fewer than ``seq_len`` tokens.
    """
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"need at least {seq_len} tokens for one window, got {len(ids)}")
    return ids[: n * seq_len].view(n, seq_len)


def text_windows(tokenizer, src, seq_len: int, key: str, role: str = "eval") -> torch.Tensor:
    """The corpus ``src`` tokenized and cut into ``[n, seq_len]`` windows (int64).

    Raises:
        InputError: fewer than ``seq_len`` tokens; names the config key ``key``.
    """
    ids = token_stream(tokenizer, src, max_tokens_for(src, role, seq_len))
    if len(ids) < seq_len:
        raise InputError(
            f"{key}: text '{src.name}' gives {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
            "lower seq_len or give more text (max_tokens)."
        )
    return windows(ids, seq_len)


def calibration_windows(tokenizer, src, num_samples: int, seq_len: int) -> list[dict]:
    """``num_samples`` GPTQ calibration rows ``{"input_ids", "attention_mask"}`` (lists of
    ``seq_len`` ints), at evenly spaced offsets of the calibration text.

    Raises:
        InputError: the text holds fewer than ``num_samples x seq_len`` tokens.
    """
    ids = token_stream(tokenizer, src, max_tokens_for(src, "calibration", seq_len, num_samples))
    need = num_samples * seq_len
    if len(ids) < need:
        raise InputError(
            f"calibration set '{src.name}' has {len(ids)} tokens, fewer than requantize.num_samples x "
            f"seq_len = {num_samples} x {seq_len}; lower them (at most {len(ids) // seq_len} samples of "
            f"{seq_len}) or give more calibration text (max_tokens >= {need})."
        )
    n_start = len(ids) - seq_len + 1
    starts = sorted({round(i * (n_start - 1) / max(1, num_samples - 1)) for i in range(num_samples)})
    return [{"input_ids": ids[s : s + seq_len].tolist(), "attention_mask": [1] * seq_len} for s in starts]
