"""The module layers and the direction of imports (README "Layout"):

    CLI and orchestration   pipeline/{__main__,run,check,plan,demo,bench*,nf4gptq}
           |
    stages                  pipeline/{dequantize,merge,verify,requantize,evaluate}
           |
    evaluation library      eval/*
           |
    pipeline library        everything else in pipeline/

A module may import its own layer and the layers below it, never one above; a stage never
imports another stage. This test reads the source (ast), it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

STAGES = {"dequantize", "merge", "verify", "requantize", "evaluate"}
TOP = {"__main__", "run", "check", "plan", "demo", "bench", "bench_scale", "bench_vocab", "nf4gptq"}


def _layer(module: str) -> int:
    pkg, _, name = module.partition(".")
    if pkg == "eval":
        return 1
    if name in STAGES:
        return 2
    if name in TOP:
        return 3
    return 0


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "eval"):
            if node.module in ("pipeline", "eval"):
                out |= {f"{node.module}.{a.name}" for a in node.names}
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] in ("pipeline", "eval")}
    return out


def test_imports_run_one_way():
    bad = []
    files = sorted((REPO / "pipeline").glob("*.py")) + sorted((REPO / "eval").glob("*.py"))
    assert len(files) > 20
    for f in files:
        me = f"{f.parent.name}.{f.stem}"
        for dep in _imports(f):
            dep = ".".join(dep.split(".")[:2])
            if _layer(dep) > _layer(me):
                bad.append(f"{me} (layer {_layer(me)}) imports {dep} (layer {_layer(dep)})")
            elif _layer(me) == 2 and dep.split(".")[1] in STAGES and dep != me:
                bad.append(f"stage {me} imports stage {dep}")
    assert not bad, "\n".join(bad)


def test_the_layer_rule_catches_an_upward_import():
    assert _layer("pipeline.verify") > _layer("eval.metrics") > _layer("pipeline.checkpoint")
    assert _layer("pipeline.run") > _layer("pipeline.verify")
