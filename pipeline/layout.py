"""The run folder and the stage table: every artefact's name is defined here, once.

A run folder ``<output.dir>/<output.run_name>/`` holds::

    config.yaml  versions.json  plan.json   what the run was asked to do, with what, and the estimate
    stages/<stage>.json                     what each stage did (``pipeline.records.StageRecord``)
    dequantized/                            the 4-bit base dequantized (stage dequantize)
    merged-<base>.unverified/               a merge candidate (stage merge; base: dequantized|original)
    adapter-combined/                       the combined adapter (stage merge, with ``adapter.combine``)
    merged/  merged-<base>/                 verified checkpoints (stage verify); ``merged-<base>.rejected``
    gptq/  gptq-<tag>/                      GPTQ checkpoints (stage requantize)
    report.json  report.md  report.png      the quality-loss report (stage evaluate), frontier.png: size/quality
    scratch/                                temporary files; cleared at the start and end of every run
    .lock                                   held by the run using the folder (``pipeline.runlock``)

:data:`STAGES` drives the CLI's stage choices, output clearing, the "run X first" messages
and the report's ordering.
"""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

MERGE_BASES = ("dequantized", "original")


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: ``pipeline.<name>.run(cfg)`` writes ``outputs`` (globs in the run
    folder) and reads the outputs of the stages in ``needs``."""

    name: str
    outputs: tuple[str, ...]
    needs: tuple[str, ...]
    summary: str


STAGES: tuple[Stage, ...] = (
    Stage("dequantize", ("dequantized",), (), "the 4-bit base back to full precision, as training saw it"),
    Stage("merge", ("merged-*.unverified", "adapter-combined"), (), "the adapter folded into the weights"),
    Stage(
        "verify",
        ("merged", "merged-dequantized", "merged-original", "merged-*.rejected"),
        ("merge",),
        "the gate: merged model against PEFT's unmerged model",
    ),
    Stage("requantize", ("gptq", "gptq-*"), ("verify",), "GPTQ checkpoints with GPTQModel"),
    Stage(
        "evaluate",
        ("report.json", "report.md", "report.png", "frontier.png"),
        ("verify",),
        "every variant against the reference",
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    """The :class:`Stage` called ``name`` (KeyError for an unknown name)."""
    return {s.name: s for s in STAGES}[name]


def stage_order(names) -> list[str]:
    """``names`` sorted in pipeline order."""
    return sorted(names, key=STAGE_NAMES.index)


@dataclass(frozen=True)
class RunLayout:
    """Paths of a run folder. Every module asks this object for a path instead of spelling it."""

    root: Path

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"

    def record(self, stage_name: str) -> Path:
        """``stages/<stage>.json``: the stage's record."""
        return self.stages_dir / f"{stage_name}.json"

    def stage_logs(self, stage_name: str) -> Path:
        """``stages/<stage>/``: logs a stage's libraries write (GPTQModel's per-layer loss)."""
        return self.stages_dir / stage_name

    @property
    def dequantized(self) -> Path:
        return self.root / "dequantized"

    def candidate(self, base: str) -> Path:
        """``merged-<base>.unverified``: a merge candidate waiting for the gate."""
        return self.root / f"merged-{base}.unverified"

    def rejected(self, base: str) -> Path:
        return self.root / f"merged-{base}.rejected"

    @property
    def merged(self) -> Path:
        """The verified merged checkpoint of the chosen merge base."""
        return self.root / "merged"

    def merged_other(self, base: str) -> Path:
        """The verified merged checkpoint of the merge base that was not chosen."""
        return self.root / f"merged-{base}"

    @property
    def combined_adapter(self) -> Path:
        return self.root / "adapter-combined"

    @property
    def gptq(self) -> Path:
        return self.root / "gptq"

    def gptq_alternative(self, tag: str) -> Path:
        return self.root / f"gptq-{tag}"

    def gptq_alternatives(self) -> list[Path]:
        return sorted(p for p in self.root.glob("gptq-*") if p.is_dir() and not p.name.startswith("."))

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_png(self) -> Path:
        return self.root / "report.png"

    @property
    def frontier_png(self) -> Path:
        return self.root / "frontier.png"

    @property
    def scratch(self) -> Path:
        """Temporary files: the stage processes' ``TMPDIR`` and GPTQModel's disk offload; cleared at
        the start and at the end of every run."""
        return self.root / "scratch"

    @property
    def lock(self) -> Path:
        """``.lock``: held by the run using this folder (:mod:`pipeline.runlock`)."""
        return self.root / ".lock"

    def outputs(self, stage_name: str) -> list[Path]:
        """What ``stage_name`` has written in this run folder (existing paths only)."""
        return [p for pattern in stage(stage_name).outputs for p in self.root.glob(pattern)]

    def unfinished(self, stage_name: str) -> list[Path]:
        """What an interrupted ``stage_name`` may have left: its temporary folders and files
        (``.<output>.partial``, ``.<output>.tmp``) and its record's temporary file."""
        hidden = [p for pattern in stage(stage_name).outputs for p in self.root.glob(f".{pattern}.*")]
        return [p for p in hidden if p.name.endswith((".partial", ".tmp"))] + list(
            self.stages_dir.glob(f".{stage_name}.json.tmp")
        )

    def clear(self, first: str) -> None:
        """Remove the outputs, unfinished leftovers and records of ``first`` and every later stage.

        Raises:
            InputError: the run folder cannot be written (read-only), naming it.
        """
        try:
            for s in STAGE_NAMES[STAGE_NAMES.index(first) :]:
                for p in self.outputs(s) + self.unfinished(s) + [self.record(s)]:
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
        except OSError as e:
            from pipeline.errors import InputError

            raise InputError(
                f"cannot remove '{e.filename}' from run folder '{self.root}' ({e.strerror}); make the folder "
                "writable, or set output.dir to another folder."
            ) from None

    def clear_unfinished(self, stage_name: str) -> None:
        """Remove what an interrupted ``stage_name`` left half-written (never a published output)."""
        for p in self.unfinished(stage_name):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)

    def clear_scratch(self) -> None:
        shutil.rmtree(self.scratch, ignore_errors=True)


PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "gptqmodel",
    "optimum",
    "accelerate",
    "datasets",
    "lm_eval",
    "safetensors",
)


def versions() -> dict:
    """Installed versions of the libraries whose behaviour the results depend on."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out
