"""Command line: ``python -m pipeline {run,stage,compare} ...``. Exit codes: 0 ok, 1 error,
2 bad input (config, paths, unsupported adapter), 3 verification failed."""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import InputError, VerificationError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline", description="qlora-merge: QLoRA adapter -> merged -> GPTQ, with a quality-loss report.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run every stage (each in its own process)")
    r.add_argument("--config", required=True)
    r.add_argument("--stages", nargs="*", help="only these stages, in this order")
    s = sub.add_parser("stage", help="run one stage in this process")
    s.add_argument("name", choices=["dequantize", "merge", "verify", "requantize", "evaluate"])
    s.add_argument("--config", required=True)
    c = sub.add_parser("check-config", help="validate a config and exit")
    c.add_argument("--config", required=True)
    a = ap.parse_args(argv)
    try:
        from pipeline.config import load_config
        cfg = load_config(a.config)
        if a.cmd == "check-config":
            print(f"{a.config}: ok")
            return 0
        if a.cmd == "run":
            from pipeline.run import run_all
            return run_all(a.config, cfg, a.stages)
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
