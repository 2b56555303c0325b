"""The pipeline: each stage in turn, each in its own Python process.

One process per stage gives each stage its own peak RSS (``ru_maxrss`` never goes
down within a process) and returns its memory to the system before the next stage.
The run folder ``<output.dir>/<output.run_name>/`` records the config, the package
versions and, in ``stages/<stage>.json``, what each stage did.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.common import log, write_json

STAGES = ["dequantize", "merge", "verify", "requantize", "evaluate"]
# What each stage writes in the run folder (globs). A run that starts at a stage removes these
# for that stage and every later one first, so a failed re-run never leaves the previous
# run's artefacts looking current.
OUTPUTS = {"dequantize": ["dequantized"], "merge": ["merged-*.unverified", "adapter-combined"],
           "verify": ["merged", "merged-dequantized", "merged-original", "merged-*.rejected"],
           "requantize": ["gptq", "gptq-*"], "evaluate": ["report.json", "report.md", "report.png"]}


def clear_outputs(run_dir: Path, first: str) -> None:
    """Remove the outputs and stage records of ``first`` and every stage after it."""
    for stage in STAGES[STAGES.index(first):]:
        for pattern in OUTPUTS[stage] + [f"stages/{stage}.json"]:
            for p in Path(run_dir).glob(pattern):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
PACKAGES = ["torch", "transformers", "peft", "bitsandbytes", "gptqmodel", "optimum", "accelerate",
            "datasets", "lm_eval", "safetensors"]


def versions() -> dict:
    """Installed versions of the libraries whose behaviour the results depend on."""
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def run_stage(cfg, name: str):
    """Run one stage in this process: ``pipeline.<name>.run(cfg)``; returns its artefact."""
    return importlib.import_module(f"pipeline.{name}").run(cfg)


def run_all(config_path: str, cfg, stages: list[str] | None = None) -> int:
    """Run ``stages`` (default: all) each in a child process; stop at the first failure.

    Returns:
        0 when all stages succeeded, else the failing stage's exit code
        (2 bad input, 3 verification failed, 1 anything else).
    """
    from pipeline.errors import InputError
    run_dir = cfg.run_dir
    stages = stages or STAGES
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder '{run_dir}' cannot be created ({e.strerror}); set output.dir to a "
                         "writable folder.") from None
    clear_outputs(run_dir, min(stages, key=STAGES.index))
    shutil.copyfile(config_path, run_dir / "config.yaml")
    write_json(run_dir / "versions.json", versions())
    for name in stages:
        log(f"=== stage {name} ===")
        rc = subprocess.call([sys.executable, "-m", "pipeline", "stage", name, "--config", str(config_path)],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if rc != 0:
            log(f"stage {name} failed (exit code {rc}); see {run_dir / 'stages' / (name + '.json')}")
            return rc
    report = Path(run_dir) / "report.md"
    if report.is_file():
        log(f"done: {report}")
    return 0
