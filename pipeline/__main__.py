"""Command line: ``qlora-merge {run,stage,check,plan} --config C`` (or ``python -m pipeline ...``).

Exit codes: 0 ok (every stage run or current), 1 unexpected error, 2 bad input (config,
paths, unsupported adapter, stale artefacts to build on, a run folder another run holds or
that cannot be written; the message says what to do), 3 an artefact failed its
verification, 4 a stage process was killed by a signal (the out-of-memory killer), 129 /
130 / 143 stopped by SIGHUP / SIGINT / SIGTERM (128 + the signal's number).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import InputError, Interrupted, VerificationError
from pipeline.layout import STAGES, STAGE_NAMES


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qlora-merge", description="QLoRA adapter -> merged -> GPTQ checkpoint, with a quality-loss report."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="check, then run the stages (each in its own process)")
    r.add_argument("--config", required=True)
    r.add_argument("--output-dir", help="run folder parent, in place of the config's output.dir")
    r.add_argument(
        "--stages", nargs="+", metavar="STAGE", help=f"only these stages, in pipeline order: {' '.join(STAGE_NAMES)}"
    )
    s = sub.add_parser(
        "stage", help="run one stage in this process", description="\n".join(f"{x.name}: {x.summary}" for x in STAGES)
    )
    s.add_argument("name", choices=STAGE_NAMES)
    s.add_argument("--config", required=True)
    c = sub.add_parser("check", help="the start-of-run check alone: config, inputs, texts, group sizes, disk")
    c.add_argument("--config", required=True)
    c.add_argument(
        "--allow-absent",
        action="store_true",
        help="a config for another machine: model paths absent here are skipped (and said so)",
    )
    p = sub.add_parser("plan", help="estimated peak RAM, GPU memory, disk and time per stage")
    p.add_argument("--config", required=True)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return ap


def _stage(cfg, name: str) -> int:
    """``stage NAME``: one stage in this process, under the run folder's lock (its parent ``run``'s,
    when it started this process), on current earlier artefacts only."""
    import contextlib

    from pipeline.resume import check_upstream
    from pipeline.run import run_stage
    from pipeline.runlock import held_by_parent, run_lock

    layout = cfg.layout
    with contextlib.nullcontext() if held_by_parent(layout.lock) else run_lock(layout.root):
        check_upstream(cfg, name)
        run_stage(cfg, name)
    return 0


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from pipeline.common import quiet_libraries
    from pipeline.processes import handle_signals, restore_signals

    quiet_libraries()
    previous = handle_signals()
    try:
        if a.cmd == "stage":
            from pipeline.processes import become_stage_child

            become_stage_child()
        from pipeline.config import load_config

        out_dir = getattr(a, "output_dir", None)
        if out_dir is not None and not out_dir.strip():
            raise InputError("--output-dir is empty: give a folder, or leave the option out to use output.dir.")
        overrides = {"output": {"dir": str(Path(out_dir).resolve())}} if out_dir is not None else None
        cfg = load_config(a.config, overrides, check_paths=not getattr(a, "allow_absent", False))
        if a.cmd == "check":
            from pipeline.check import check_run

            out = check_run(cfg, allow_absent=getattr(a, "allow_absent", False))
            print(f"{a.config}: ok" + "".join(f"\n  not checked here: {s}" for s in out["skipped"]))
            return 0
        if a.cmd == "plan":
            from pipeline.check import check_run
            from pipeline.plan import table

            out = check_run(cfg)
            print(json.dumps(out["plan"], indent=2) if a.json else table(out["plan"]))
            return 0
        if a.cmd == "run":
            from pipeline.run import run_all

            return run_all(cfg, a.stages)
        return _stage(cfg, a.name)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"verification failed: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        where = f"stage {a.name}" if a.cmd == "stage" else "the start-of-run check" if a.cmd == "run" else a.cmd
        done = (
            "its temporary files were removed and nothing unfinished was published"
            if a.cmd == "stage"
            else "nothing was written"
        )
        print(f"stopped by {e.signame} during {where}; {done}", file=sys.stderr)
        return e.exit_code
    finally:
        restore_signals(previous)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C while the libraries import, before the signal handlers are set
        print("stopped by SIGINT before the run started; nothing was written", file=sys.stderr)
        sys.exit(130)
