"""The records stages write and read: the contract between stages, defined once.

Each stage writes ``stages/<stage>.json`` (a :class:`StageRecord`) through
:func:`stage_record`; later stages and the report read them with :func:`read_record`.
The nested records (a verify candidate, a GPTQ build, a budget try, a score) are
:class:`~typing.TypedDict` so that they stay plain JSON on disk.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Optional, TypedDict

import torch

from pipeline.common import peak_rss_bytes, write_error, write_json
from pipeline.layout import RunLayout


class StageRecord(TypedDict, total=False):
    """``stages/<stage>.json``. Every stage writes the first six keys; the rest are its own.

    ``status``: ``ok``, ``failed``, ``interrupted`` (a signal stopped it), ``killed`` (written by
    ``run`` for a stage process killed outright), ``skipped``; ``seconds``: wall time;
    ``peak_rss_bytes``: the stage process's peak resident memory; ``peak_cuda_bytes``: peak
    CUDA memory allocated by torch (0 without a GPU); ``inputs``: fingerprints of the config
    sections and files the stage read, ``outputs``: of what it wrote, ``consumed``: of the
    earlier outputs it moved on (:mod:`pipeline.fingerprint`, :mod:`pipeline.resume`);
    ``error``: the error text when it failed.
    """

    stage: str
    status: str
    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int
    inputs: dict
    outputs: dict
    consumed: dict
    error: str
    artefact: Optional[str]


class Score(TypedDict, total=False):
    """One model scored on windows (``eval.metrics.score``).

    ``perplexity`` = exp(``nll_mean``), ``nll_mean`` in nats/token over ``tokens`` predicted
    tokens; ``nll_per_window``: float64 [n_windows], summed NLL per window (nats). Against a
    reference: ``kl_divergence`` (mean KL(P_ref || P), nats/token), ``kl_median``, ``kl_p99``,
    ``kl_max``, ``top1_agreement`` (fraction), ``kl_per_token`` (float64 [tokens]),
    ``nonfinite`` (windows whose logits held inf/NaN, on either side).
    """

    perplexity: float
    nll_mean: float
    tokens: int
    nll_per_window: object
    kl_divergence: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    kl_per_token: object
    nonfinite: int
    seconds: float
    tokens_per_second: float


class VerifyCandidate(TypedDict, total=False):
    """One merge candidate in ``stages/verify.json`` (``candidates.<base>``).

    ``exact_kl``: mean KL(its own unmerged model || it) on the verify text, nats/token;
    ``kl_divergence`` / ``kl_max`` / ``top1_agreement`` / ``perplexity``: against the
    reference (the trained model); ``problems``: why it failed (empty when it passed).
    """

    passed: bool
    problems: list
    exact_kl: float
    kl_divergence: float
    kl_max: float
    top1_agreement: float
    perplexity: float
    artefact: Optional[str]


class GPTQBuild(TypedDict, total=False):
    """One GPTQ checkpoint in ``stages/requantize.json`` (the main one, ``alternatives``, budget tries).

    ``bits_per_weight``: estimated storage per quantized weight (code + group scale and zero);
    ``reload_calibration_nll``: mean NLL (nats/token) of one calibration row after reloading in
    plain ``transformers``; ``size_bytes``: the folder on disk.
    """

    artefact: Optional[str]
    tag: str
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    bits_per_weight: float
    reload_calibration_nll: float
    size_bytes: int
    seconds: float


class BudgetTry(GPTQBuild, total=False):
    """A GPTQ setting tried against the quality budget on the verify text."""

    perplexity: float
    perplexity_increase: float
    kl_divergence: float
    top1_agreement: float
    within_budget: bool


@contextlib.contextmanager
def stage_record(
    layout: RunLayout, stage: str, inputs: dict | None = None, outputs_later: bool = False
) -> Iterator[StageRecord]:
    """Time a stage and write ``stages/<stage>.json`` when it ends.

    The yielded dict is filled by the stage (artefact path, figures); ``seconds``,
    ``peak_rss_bytes``, ``peak_cuda_bytes`` and, when it finished, the fingerprints of its
    outputs (``outputs``; with ``outputs_later`` the stage adds them itself with
    :func:`record_outputs`) are added here. A stage that raises is recorded with ``status:
    failed`` (``interrupted`` for a signal) and the error text, then the error propagates.

    Raises:
        InputError: the record cannot be written (full or read-only disk), naming the folder.
    """
    from pipeline.errors import Interrupted
    from pipeline.fingerprint import outputs

    rec: StageRecord = {"stage": stage, "status": "running"}
    if inputs is not None:
        rec["inputs"] = inputs
    t0 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield rec
        rec["status"] = rec.get("status") if rec.get("status") not in (None, "running") else "ok"
        if rec["status"] in ("ok", "skipped") and not outputs_later:
            rec["outputs"] = outputs(layout, stage)
    except BaseException as e:
        rec["status"] = "interrupted" if isinstance(e, Interrupted) else "failed"
        rec["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        rec["peak_rss_bytes"] = peak_rss_bytes()
        rec["peak_cuda_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
        try:
            layout.stages_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if err := write_error(layout.stages_dir / "x", e):
                raise err from None
            raise
        write_json(layout.record(stage), rec)


def record_outputs(layout: RunLayout, stage: str) -> None:
    """Add the fingerprints of ``stage``'s outputs to its record, for a stage that writes them
    after its record (evaluate's report holds the records). Until then the stage is not current."""
    from pipeline.fingerprint import outputs

    rec = read_record(layout, stage)
    if rec is not None and rec.get("status") == "ok":
        rec["outputs"] = outputs(layout, stage)
        write_json(layout.record(stage), rec)


def read_record(layout: RunLayout, stage: str) -> StageRecord | None:
    """The record ``stages/<stage>.json`` of a run folder, or None when absent or unreadable."""
    f = layout.record(stage)
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_records(layout: RunLayout) -> dict[str, StageRecord]:
    """Every stage record of a run folder, in pipeline order."""
    from pipeline.layout import STAGE_NAMES

    out = {}
    for name in STAGE_NAMES:
        r = read_record(layout, name)
        if r is not None:
            out[name] = r
    return out
