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

# Held-out splits: every 5th pydoc topic (sorted by name), every 10th Alpaca or chat record. The demo's
# adapter training and the pipeline's held-out texts both use these rules.
HELDOUT_EVERY = {"embedded": 5, "alpaca": 10, "records": 10}


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


def alpaca_messages(r: dict) -> list[dict]:
    """An Alpaca record as chat messages: the instruction (and its input after a blank line) from
    the user, the output from the assistant."""
    user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]


def chat_messages(r: dict) -> list[dict]:
    """The ``messages`` of a chat record (``{"messages": [{"role", "content"}]}``, or ShareGPT's
    ``{"conversations": [{"from", "value"}]}`` with human/gpt/system mapped to user/assistant/system)."""
    if "messages" in r:
        return [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    return [{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]]


def messages_as_alpaca(messages: list[dict]) -> str:
    """Chat messages in the Alpaca prompt, for tokenizers without a chat template: each user turn
    with the assistant turn after it as one instruction block; a system message as a first paragraph."""
    blocks, pending = [], None
    for m in messages:
        if m["role"] == "system":
            blocks.append(m["content"])
        elif m["role"] == "user":
            if pending is not None:
                blocks.append(f"### Instruction:\n{pending}")
            pending = m["content"]
        else:
            blocks.append(alpaca_prompt({"instruction": pending or "", "output": m["content"]}))
            pending = None
    if pending is not None:
        blocks.append(f"### Instruction:\n{pending}")
    return "\n\n".join(blocks)


def resolved_template(template: str, tokenizer) -> str:
    """``chat`` or ``alpaca``: how instruction/chat records are rendered. ``auto``: the tokenizer's
    chat template when it has one, else the Alpaca prompt (no tokenizer: the Alpaca prompt)."""
    if template != "auto":
        return template
    return "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "alpaca"


def render_record(r: dict, fmt: str, template: str, tokenizer=None) -> str:
    """One instruction (``fmt="alpaca"``) or chat (``fmt="chat"``) record as training text, rendered
    with ``template`` (:func:`resolved_template`): the tokenizer's chat template (the whole
    conversation, no generation prompt) or the Alpaca prompt. The demo's adapter training and every
    text source use this one function, so calibration and evaluation see what training saw."""
    how = resolved_template(template, tokenizer)
    if how == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise InputError("template 'chat' needs a tokenizer with a chat template; use template: alpaca")
        msgs = alpaca_messages(r) if fmt == "alpaca" else chat_messages(r)
        return tokenizer.apply_chat_template(msgs, tokenize=False)
    return alpaca_prompt(r) if fmt == "alpaca" else messages_as_alpaca(chat_messages(r))


def _valid_record(r, fmt: str) -> bool:
    if not isinstance(r, dict):
        return False
    if fmt == "alpaca":
        return "instruction" in r and "output" in r
    msgs = r.get("messages", r.get("conversations"))
    keys = ("role", "content") if "messages" in r else ("from", "value")
    return isinstance(msgs, list) and all(isinstance(m, dict) and all(k in m for k in keys) for m in msgs)


def read_records(path: str | Path, fmt: str = "alpaca", name: str = "text") -> list[dict]:
    """The records of a JSON file (a list) or a JSONL file (one object per line): Alpaca records
    (``instruction``, optional ``input``, ``output``) or chat records (``messages``: role/content,
    or ShareGPT ``conversations``: from/value).

    Raises:
        InputError: not JSON/JSONL, or a record of another shape (names the line or index).
    """
    path = Path(path)
    what = "Alpaca records (instruction, input, output)" if fmt == "alpaca" else "chat records (messages)"
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            recs = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(
            f"text source '{name}': {path} is not a JSON{'L' if path.suffix == '.jsonl' else ''} file ({e})"
        ) from None
    if not isinstance(recs, list):
        raise InputError(f"{path}: not a JSON list of {what}")
    bad = next((i for i, r in enumerate(recs) if not _valid_record(r, fmt)), None)
    if bad is not None:
        where = f"line {bad + 1}" if path.suffix == ".jsonl" else f"record {bad}"
        raise InputError(f"{path}: {where} is not one of the {what}")
    return recs


def alpaca_records(path: str | Path, name: str = "text") -> list[dict]:
    """The records of an Alpaca JSON/JSONL file (a list of ``{instruction, input, output}``).

    Raises:
        InputError: not JSON, or not a list of such records.
    """
    return read_records(path, "alpaca", name)


def load_texts(src, tokenizer=None) -> list[str]:
    """Documents of a :class:`pipeline.config.TextSource` as a list of strings: one per topic, file,
    JSONL line or record; instruction/chat records rendered with :func:`render_record`.

    Raises:
        InputError: file unreadable or not UTF-8, JSONL line without ``text_field``, bad record file.
    """
    if src.source == "embedded":
        return embedded_topics(src.split)
    if src.format in ("alpaca", "chat"):
        recs = read_records(src.path, src.format, src.name)
        return [
            render_record(r, src.format, src.template, tokenizer)
            for i, r in enumerate(recs)
            if in_split(i, HELDOUT_EVERY["records"], src.split)
        ]
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
    text = "\n\n".join(load_texts(src, tokenizer))
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


def calibration_parts(src) -> list[tuple[object, float]]:
    """(text source, normalized weight) of a calibration source: a mix's parts, or the one source.
    Weights are finite and positive (the config refuses others); scaled by the largest first, so
    that huge weights do not overflow their sum."""
    parts = getattr(src, "mix", None)
    if not parts:
        return [(src, 1.0)]
    top = max(p.weight for p in parts)
    total = sum(p.weight / top for p in parts)
    return [(p, p.weight / top / total) for p in parts]


def window_shares(src, num_samples: int, key: str = "requantize.num_samples") -> list[int]:
    """Windows of each part of a calibration source (:func:`_parts`): ``num_samples`` split by weight,
    largest remainder first (ties: config order).

    Raises:
        InputError: a part whose weight gives it no window (raise num_samples or its weight).
    """
    parts = calibration_parts(src)
    exact = [w * num_samples for _, w in parts]
    n = [int(x) for x in exact]
    for i in sorted(range(len(parts)), key=lambda i: (n[i] - exact[i], i))[: num_samples - sum(n)]:
        n[i] += 1
    empty = [p.name for (p, _), k in zip(parts, n) if k == 0]
    if empty:
        raise InputError(
            f"calibration mix '{src.name}': part(s) {empty} get no window of {num_samples} at their weight; raise "
            f"{key} or their weight."
        )
    return n


def record_tokens(tokenizer, src, max_tokens: int) -> list[list[int]]:
    """The documents of ``src`` (:func:`load_texts`: topics, lines, rendered records) tokenized one by
    one (no special tokens added; those a chat template writes are kept), in corpus order, until
    ``max_tokens`` tokens are taken (the last one cut there)."""
    out, total = [], 0
    docs = load_texts(src, tokenizer)
    for start in range(0, len(docs), 64):
        batch = [d[: max(1, max_tokens - total) * 12] for d in docs[start : start + 64]]  # >= 1 char per token
        for ids in tokenizer(batch, add_special_tokens=False).input_ids:
            ids = ids[: max_tokens - total]
            if ids:
                out.append(ids)
                total += len(ids)
            if total >= max_tokens:
                return out
    return out


def pack_records(records: list[list[int]], seq_len: int, n_windows: int, sep: list[int], seed: int = 0):
    """Pack whole records into at most ``n_windows`` windows of at most ``seq_len`` tokens.

    Records are taken in a seeded shuffle of the corpus (spread over all of it); each goes, after a
    separator ``sep`` (the tokens of a blank line, as the documents are joined in training), into
    the first window it fits in whole, or opens a new window. A record is cut only where that
    cannot be avoided: one longer than ``seq_len`` gives full windows of ``seq_len`` and a tail
    that is packed like a record. Windows may end a few tokens short of ``seq_len`` rather than
    cut a record; a record that fits no window is left out.

    Returns:
        ``(windows, stats)``: the token lists, and ``{"records": whole records packed, "records_cut":
        records split across windows, "tokens": tokens in the windows}``.
    """
    import random

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    windows: list[list[int]] = []
    whole = cut = 0
    full = 0
    for i in order:
        r = records[i]
        pieces = [r[j : j + seq_len] for j in range(0, len(r), seq_len)]
        placed = 0
        for piece in pieces:
            if full == n_windows:
                break
            target = next((w for w in windows if len(w) + len(sep) + len(piece) <= seq_len and w), None)
            if target is not None:
                target.extend(sep + piece)
            elif len(windows) < n_windows:
                target = list(piece)
                windows.append(target)
            else:
                continue
            placed += 1
            full += len(target) == seq_len
        if placed:
            whole += len(pieces) == 1
            cut += len(pieces) > 1
        if full == n_windows:
            break
    return windows, {"records": whole, "records_cut": cut, "tokens": sum(map(len, windows))}


def calibration_set(tokenizer, src, num_samples: int, seq_len: int) -> tuple[list[dict], dict]:
    """GPTQ calibration rows ``{"input_ids", "attention_mask"}`` (at most ``seq_len`` tokens each) and
    their composition, from one text source or a mix (``{name, mix: [{<text source>, weight}]}``).

    Each part gets its share of the ``num_samples`` windows by weight (:func:`window_shares`) and
    fills them by packing its own whole records (:func:`pack_records`): instruction and chat
    records rendered as in training (:func:`render_record`), plain documents as they are.

    Returns:
        ``(rows, composition)``; composition: ``{"name", "windows", "seq_len", "tokens", "fill" (tokens
        / windows x seq_len), "parts": [{"name", "format", "template", "weight", "windows", "tokens",
        "token_share", "records", "records_cut"}]}``.
    Raises:
        InputError: a part holds too little text for its windows.
    """
    sep = tokenizer("\n\n", add_special_tokens=False).input_ids
    rows, parts = [], []
    for (part, weight), n in zip(calibration_parts(src), window_shares(src, num_samples)):
        recs = record_tokens(tokenizer, part, max_tokens_for(part, "calibration", seq_len, n))
        have = sum(map(len, recs))
        wins, st = pack_records(recs, seq_len, n, sep)
        if have < n * seq_len or len(wins) < n:
            raise InputError(
                f"calibration set '{part.name}' has {have} tokens, fewer than requantize.num_samples x "
                f"seq_len = {n} x {seq_len}{' (its share of the mix)' if len(calibration_parts(src)) > 1 else ''}; lower "
                f"them (at most {have // seq_len} samples of {seq_len}) or give more calibration text "
                f"(max_tokens >= {n * seq_len})."
            )
        rows += [{"input_ids": w, "attention_mask": [1] * len(w)} for w in wins]
        fmt = getattr(part, "format", "text") if part.source != "embedded" else "text"
        parts.append(
            {
                "name": part.name,
                "format": fmt,
                "template": resolved_template(part.template, tokenizer) if fmt in ("alpaca", "chat") else None,
                "weight": round(weight, 6),
                "windows": len(wins),
                **st,
            }
        )
    total = sum(p["tokens"] for p in parts)
    for p in parts:
        p["token_share"] = round(p["tokens"] / total, 4)
    comp = {
        "name": src.name,
        "windows": len(rows),
        "seq_len": seq_len,
        "tokens": total,
        "fill": round(total / (len(rows) * seq_len), 4),
        "parts": parts,
    }
    return rows, comp


def calibration_windows(tokenizer, src, num_samples: int, seq_len: int) -> list[dict]:
    """The rows of :func:`calibration_set` (without the composition)."""
    return calibration_set(tokenizer, src, num_samples, seq_len)[0]
