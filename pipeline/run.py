"""The pipeline: the start-of-run check, then each stage in turn, each in its own Python process.

One process per stage gives each stage its own peak RSS (``ru_maxrss`` never goes down
within a process) and returns its memory to the system before the next stage. The run
folder (:class:`pipeline.layout.RunLayout`) records the config, the package versions, the
plan and, in ``stages/<stage>.json``, what each stage did.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import yaml

from pipeline.common import log, write_json, write_text
from pipeline.errors import InputError
from pipeline.layout import stage, versions


def run_stage(cfg, name: str):
    """Run one stage in this process: ``pipeline.<name>.run(cfg)``; returns its artefact."""
    return importlib.import_module(f"pipeline.{name}").run(cfg)


def _check_inputs(cfg, first: str) -> None:
    """Refuse to start at ``first`` when an earlier stage's artefact it needs is missing, before
    anything is deleted.

    Raises:
        InputError: naming the stage to run first.
    """
    layout = cfg.layout
    for need in stage(first).needs:
        if not layout.outputs(need):
            raise InputError(
                f"--stages starts at '{first}', which needs the output of '{need}' "
                f"({', '.join(stage(need).outputs)}) in {layout.root}; none is there. Run the "
                f"'{need}' stage first (or the whole pipeline)."
            )


def run_all(cfg, stages: list[str] | None = None) -> int:
    """Check, then run ``stages`` (default: all) each in a child process; stop at the first failure.

    The config as it runs (paths resolved, overrides applied) is written to ``config.yaml`` in
    the run folder, and every stage process reads that file.

    Returns:
        0 when all stages succeeded, else the failing stage's exit code
        (2 bad input, 3 verification failed, 1 anything else).
    Raises:
        InputError: the start-of-run check failed (nothing is written then).
    """
    from pipeline.check import check_run
    from pipeline.plan import table

    checked = check_run(cfg, stages)
    stages = checked["stages"]
    layout = cfg.layout
    if checked["plan"]:
        log(table(checked["plan"]).replace("\n", "\n[qlora-merge] "))
    _check_inputs(cfg, stages[0])
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(
            f"output folder '{layout.root}' cannot be created ({e.strerror}); set output.dir to a writable folder."
        ) from None
    layout.clear_scratch()
    layout.clear(stages[0])
    config_path = layout.root / "config.yaml"
    write_text(config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(layout.root / "versions.json", versions())
    if checked["plan"]:
        write_json(layout.root / "plan.json", checked["plan"])
    for name in stages:
        log(f"=== stage {name} ===")
        rc = subprocess.call(
            [sys.executable, "-m", "pipeline", "stage", name, "--config", str(config_path)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if rc != 0:
            rec = layout.record(name)
            where = f"; see {rec}" if rec.is_file() else ""
            log(f"stage {name} failed (exit code {rc}){where}")
            return rc
    if layout.report_md.is_file():
        log(f"done: {layout.report_md}")
    return 0
