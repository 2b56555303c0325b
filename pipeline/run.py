"""The pipeline: the start-of-run check, then each stage in turn, each in its own Python process.

One process per stage gives each stage its own peak RSS (``ru_maxrss`` never goes down
within a process) and returns its memory to the system before the next stage. The run
folder (:class:`pipeline.layout.RunLayout`) records the config, the package versions, the
plan and, in ``stages/<stage>.json``, what each stage did, with the fingerprints of what it
read and wrote: a rerun skips the stages that are still current (:mod:`pipeline.resume`).
One run at a time holds the folder (:mod:`pipeline.runlock`); signals and killed stage
processes are handled as :mod:`pipeline.processes` says.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

import yaml

from pipeline.common import log, write_json, write_text
from pipeline.errors import Interrupted
from pipeline.layout import versions

KILLED = 4  # exit code: a stage process was killed by a signal this run did not send


def run_stage(cfg, name: str):
    """Run one stage in this process: ``pipeline.<name>.run(cfg)``; returns its artefact."""
    return importlib.import_module(f"pipeline.{name}").run(cfg)


def _start(cfg, checked: dict, to_run: list[str]) -> str:
    """Clear what the stages to run will rewrite, write the run's config, versions and plan; returns
    the path of ``config.yaml``, which every stage process reads."""
    layout = cfg.layout
    layout.clear(to_run[0])
    layout.scratch.joinpath("tmp").mkdir(parents=True, exist_ok=True)
    config_path = layout.root / "config.yaml"
    write_text(config_path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    write_json(layout.root / "versions.json", versions())
    if checked["plan"]:
        write_json(layout.root / "plan.json", checked["plan"])
    return str(config_path)


def _unfinished_record(cfg, name: str, res) -> None:
    """``stages/<name>.json`` for a stage process that ended without writing its record."""
    if res.stopped_by is None:
        status, error = "killed", f"the stage process was killed by {signal.Signals(-res.returncode).name}"
    elif res.returncode < 0:
        status, error = "interrupted", f"sent {res.stopped_by.signame}, killed when it did not stop in time"
    else:
        status, error = "interrupted", f"stopped by {res.stopped_by.signame} before it recorded anything"
    cfg.layout.stages_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        cfg.layout.record(name),
        {"stage": name, "status": status, "error": error, "peak_rss_bytes": res.peak_rss_bytes},
    )


def _stopped_message(name: str, res, finished: list[str]) -> str:
    """What is true after a signal stopped the run while stage ``name`` ran."""
    e = res.stopped_by
    if res.returncode == 0:
        what = f"stage {name} had finished when it came, and is recorded"
        finished = finished + [name]
    else:
        how = "was killed after the grace period" if res.killed_after_grace else f"stopped (exit code {res.returncode})"
        what = (
            f"stage {name} {how} before it finished; its temporary files were removed and its record says so, "
            "so anything it had published is not current and will be redone"
        )
    done = ", ".join(finished) or "none"
    return f"{e.signame}: {what}. Stages finished in this run: {done}. Run the same command again to resume."


def _run_stages(cfg, config_path: str, to_run: list[str]) -> int:
    """Run ``to_run`` in child processes, stopping at the first failure; the exit code."""
    from pipeline.processes import describe_kill, run_child

    layout = cfg.layout
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(layout.scratch / "tmp")}
    for i, name in enumerate(to_run):
        log(f"=== stage {name} ===")
        res = run_child([sys.executable, "-m", "pipeline", "stage", name, "--config", config_path], env)
        if res.returncode != 0 and (res.stopped_by is not None or res.returncode < 0):
            layout.clear_unfinished(name)
            if not layout.record(name).is_file():
                _unfinished_record(cfg, name, res)
        if res.stopped_by is not None:
            log(_stopped_message(name, res, to_run[:i]))
            return res.stopped_by.exit_code
        if res.returncode < 0:
            log(describe_kill(name, -res.returncode, res.peak_rss_bytes) + f" Record: {layout.record(name)}")
            return KILLED
        if res.returncode != 0:
            rec = layout.record(name)
            log(f"stage {name} failed (exit code {res.returncode}){f'; see {rec}' if rec.is_file() else ''}")
            return res.returncode
    return 0


def run_all(cfg, stages: list[str] | None = None) -> int:
    """Check, take the run folder's lock, skip the stages that are current, run the others each in a
    child process; stop at the first failure.

    The config as it runs (paths resolved, overrides applied) is written to ``config.yaml`` in
    the run folder, and every stage process reads that file. ``scratch/`` is emptied at the
    start and at the end.

    Returns:
        0 when every stage is done (run now or current), else the failing stage's exit code
        (2 bad input, 3 verification failed, 1 anything else), :data:`KILLED` when a stage
        process was killed by a signal, 128 + the signal's number for SIGINT, SIGTERM or SIGHUP.
    Raises:
        InputError: the start-of-run check failed (nothing is written then), another run holds
            the folder, the stages to run would build on stale artefacts or delete outputs they
            do not rebuild (nothing is deleted then), or the folder cannot be written.
    """
    from pipeline.check import check_run
    from pipeline.plan import table
    from pipeline.resume import plan_run
    from pipeline.runlock import run_lock

    checked = check_run(cfg, stages)
    layout = cfg.layout
    try:
        with run_lock(layout.root):
            try:
                skip, to_run, why = plan_run(cfg, checked["stages"])
                for s in skip:
                    log(f"stage {s}: current (its recorded inputs and outputs match), skipped")
                if not to_run:
                    log(f"every requested stage is current; nothing to do in {layout.root}")
                    return 0
                log(f"stage {to_run[0]}: to run: " + "; ".join(why[to_run[0]][:4]))
                if checked["plan"]:
                    log(table(checked["plan"]).replace("\n", "\n[qlora-merge] "))
                layout.clear_scratch()
                rc = _run_stages(cfg, _start(cfg, checked, to_run), to_run)
            finally:
                layout.clear_scratch()
    except Interrupted as e:
        log(
            f"{e.signame}: stopped while no stage was running; the stages recorded as finished in "
            f"{layout.stages_dir} are intact. Run the same command again to resume."
        )
        return e.exit_code
    if rc == 0 and layout.report_md.is_file():
        log(f"done: {layout.report_md}")
    return rc
