"""Command line: ``qlora-merge {run,stage,check,plan} --config C`` (or ``python -m pipeline ...``).

Exit codes: 0 ok, 1 unexpected error, 2 bad input (config, paths, unsupported adapter; the
message says what to do), 3 an artefact failed its verification, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.errors import InputError, VerificationError
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
    sub.add_parser("check-config", help=argparse.SUPPRESS).add_argument("--config", required=True)
    return ap


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    from pipeline.common import quiet_libraries

    quiet_libraries()
    try:
        from pipeline.config import load_config

        overrides = {"output": {"dir": str(Path(a.output_dir).resolve())}} if getattr(a, "output_dir", None) else None
        cfg = load_config(a.config, overrides, check_paths=not getattr(a, "allow_absent", False))
        if a.cmd in ("check", "check-config"):
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
        from pipeline.run import run_stage

        run_stage(cfg, a.name)
        return 0
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"verification failed: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted; finished artefacts are intact, unfinished ones were removed", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
