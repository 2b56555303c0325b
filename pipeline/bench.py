"""Benchmark: the pipeline's stages on the real SmolLM2-135M demo, with wall time and peak
memory per stage (each stage in its own process), written to ``<out>/bench.md`` and ``bench.json``.

Usage: ``python -m pipeline.bench [--config configs/smollm2-135m-demo.yaml] [--out runs/bench]``
(``make bench``). Timings belong here, never in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/smollm2-135m-demo.yaml")
    ap.add_argument("--out", default="runs/bench")
    a = ap.parse_args(argv)
    from pipeline.common import quiet_libraries
    from pipeline.config import load_config
    from pipeline.layout import versions
    from pipeline.run import run_all

    quiet_libraries()
    out = Path(a.out).resolve()
    rc = run_all(load_config(a.config, {"output": {"dir": str(out.parent), "run_name": out.name}}))
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((out / "stages").glob("*.json"))}
    rows = {
        s: {"seconds": r.get("seconds"), "peak_rss_bytes": r.get("peak_rss_bytes"), "status": r.get("status")}
        for s, r in stages.items()
    }
    doc = {
        "config": a.config,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "versions": versions(),
        "stages": rows,
        "total_seconds": round(sum(r["seconds"] or 0 for r in rows.values()), 1),
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=2))
    md = ["| stage | seconds | peak RSS (MiB) |", "|---|---|---|"] + [
        f"| {s} | {r['seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |" for s, r in rows.items()
    ]
    (out / "bench.md").write_text("\n".join(md) + f"\n\nTotal: {doc['total_seconds']} s on {os.cpu_count()} cores.\n")
    print("\n".join(md))
    return rc


if __name__ == "__main__":
    sys.exit(main())
