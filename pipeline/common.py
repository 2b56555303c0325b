"""Small shared pieces: quiet library start-up, dtypes and devices, stage records,
atomic publishing of artefact folders, and the text corpora."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator

# Library noise that says nothing to a user of this job: bitsandbytes' missing optional
# `kernels` package, torchao's CUDA-only extensions on a CPU build, GPTQModel's banner.
for _name in ("bitsandbytes", "torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
os.environ.setdefault("GPTQMODEL_DISABLE_GIL_WARNING", "1")
warnings.filterwarnings("ignore", message=".*register_constant.*")
try:  # GPTQModel's banner and INFO tables (it is imported by peft whenever installed)
    from logbar import LogBar
    LogBar.shared().setLevel(logging.WARNING)
except ImportError:  # pragma: no cover
    pass

import torch  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def log(msg: str) -> None:
    """Print a progress line to stderr (stdout stays free for machine-readable output)."""
    print(f"[qlora-merge] {msg}", file=sys.stderr, flush=True)


def pick_device(want: str = "auto") -> str:
    """'cuda' when asked for or available under 'auto', else 'cpu'."""
    if want == "cuda" and not torch.cuda.is_available():
        from pipeline.errors import InputError
        raise InputError("dequantize.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'.")
    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return want


def compute_dtype_for(stored: str, device: str) -> torch.dtype:
    """dtype to run a model of stored dtype ``stored`` in: float32 on CPU (half-precision
    matmuls are slow there and upcasting the weights is exact), the stored dtype on GPU."""
    return torch.float32 if device == "cpu" else DTYPES[stored]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def stage_record(run_dir: Path, stage: str) -> Iterator[dict]:
    """Time a stage and write ``<run_dir>/stages/<stage>.json`` when it ends.

    The yielded dict is filled by the stage (artefact path, figures); ``seconds``
    (wall time), ``peak_rss_bytes`` (of this process, so run one stage per process
    for a per-stage peak) and ``peak_cuda_bytes`` are added here. A stage that
    raises is recorded with ``status: failed`` and the error text.
    """
    rec: dict = {"stage": stage, "status": "running"}
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield rec
        rec["status"] = rec.get("status") if rec.get("status") not in (None, "running") else "ok"
    except BaseException as e:
        rec["status"] = "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["peak_rss_bytes"] = peak_rss_bytes()
        rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        out = Path(run_dir) / "stages"
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stage}.json").write_text(json.dumps(rec, indent=2, default=str))


@contextlib.contextmanager
def publish_dir(final: Path) -> Iterator[Path]:
    """Write an artefact folder atomically: yield a temporary sibling, rename it to
    ``final`` only if the block finishes. On error the temporary folder is removed and
    ``final`` is left as it was (absent or the previous complete artefact)."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def dir_size_bytes(path: str | os.PathLike) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def embedded_topics(split: str) -> list[str]:
    """Texts of CPython's ``pydoc_data.topics`` (ships with every CPython).

    Split by topic: topics are sorted by name and every fifth one (index % 5 == 0)
    is ``heldout``; the rest are ``train``; ``all`` returns both. Topic order is
    stable across Python versions of the same series.
    """
    from pydoc_data.topics import topics
    names = sorted(topics)
    keep = {"train": lambda i: i % 5 != 0, "heldout": lambda i: i % 5 == 0, "all": lambda i: True}[split]
    return [topics[n] for i, n in enumerate(names) if keep(i)]


def load_texts(src) -> list[str]:
    """Documents of a :class:`pipeline.config.TextSource` as a list of strings.

    Raises:
        InputError: file unreadable, JSONL line without ``text_field``.
    """
    from pipeline.errors import InputError
    if src.source == "embedded":
        return embedded_topics(src.split)
    if src.format == "alpaca":
        try:
            recs = json.loads(Path(src.path).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"text source '{src.name}': {src.path} is not a JSON file ({e})") from None
        if not isinstance(recs, list) or not all(isinstance(r, dict) and "instruction" in r for r in recs):
            raise InputError(f"{src.path}: not a JSON list of Alpaca records (instruction, input, output)")
        keep = {"train": lambda i: i % 10 != 0, "heldout": lambda i: i % 10 == 0, "all": lambda i: True}[src.split]
        return [alpaca_prompt(r) for i, r in enumerate(recs) if keep(i)]
    if src.source == "hub":
        import datasets
        ds = datasets.load_dataset(src.hub_name, src.hub_config, split=src.hub_split)
        return [t for t in ds[src.text_field] if t and t.strip()]
    path = Path(src.path)
    try:
        return _read_file(path, src)
    except UnicodeDecodeError as e:
        raise InputError(f"text source '{src.name}': {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def _read_file(path: Path, src) -> list[str]:
    from pipeline.errors import InputError
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


def alpaca_prompt(r: dict) -> str:
    """An Alpaca record rendered with the Alpaca training prompt (instruction, optional input, response)."""
    inp = f"### Input:\n{r['input']}\n\n" if r.get("input") else ""
    return f"### Instruction:\n{r['instruction']}\n\n{inp}### Response:\n{r['output']}"


def token_stream(tokenizer, src, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate a corpus' documents (joined by blank lines) and tokenize once.

    Returns a 1-D ``int64`` tensor of at most ``max_tokens`` (default
    ``src.max_tokens``) token ids, no special tokens added.
    """
    text = "\n\n".join(load_texts(src))
    limit = max_tokens or src.max_tokens
    # tokenise a prefix generous enough for `limit` tokens (>= 1 char per token)
    ids = tokenizer(text[: limit * 12], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[:limit]


def text_windows(tokenizer, src, seq_len: int, key: str):
    """The corpus ``src`` tokenized and cut into ``[n, seq_len]`` windows (see ``eval.metrics.windows``).

    Raises:
        InputError: fewer than ``seq_len`` tokens; names the config key ``key``.
    """
    from eval.metrics import windows
    from pipeline.errors import InputError
    ids = token_stream(tokenizer, src)
    if len(ids) < seq_len:
        raise InputError(f"{key}: text '{src.name}' gives {len(ids)} tokens, fewer than one window of seq_len={seq_len}; "
                         "lower seq_len or give more text (max_tokens).")
    return windows(ids, seq_len)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
