"""eval.compare on two made-up report.json files, and its exit code 2 on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import REPO


def _variant(size, ppl, kl, top1, acc=None, ds="wiki"):
    v = {
        "perplexity": {ds: ppl},
        "kl_divergence": {ds: kl},
        "top1_agreement": {ds: top1},
        "size_bytes": size,
        "path": f"/x/{size}",
    }
    if acc is not None:
        v["accuracy"] = {"cloze": {"acc": acc, "acc_stderr": 0.021, "n": 400}}
    return v


def _runs(tmp_path):
    a, b = tmp_path / "run-a", tmp_path / "run-b"
    a.mkdir(), b.mkdir()
    (a / "report.json").write_text(
        json.dumps(
            {
                "run_name": "alpha",
                "variants": {
                    "gptq": _variant(3 * 2**20, 12.3456, 0.0123, 0.9512, acc=0.615),
                    "reference": _variant(10 * 2**20, 11.1111, 0.0, 1.0, acc=0.640),
                },
                "verification": {"passed": True, "kl_divergence": 1e-7},
                "stages": {"merge": {"seconds": 1.5, "peak_rss_bytes": 123}},
                "config": {},
            }
        )
    )
    # run b: a second dataset, no accuracy, an extra key, no verification/stages
    vb = _variant(5 * 2**20, 13.5, 0.0456, 0.9, ds="wiki")
    vb["perplexity"]["code"], vb["perplexity_ratio"] = 7.25, {"wiki": {"ratio": 1.2}}
    (b / "report.json").write_text(json.dumps({"run_name": "beta", "variants": {"gptq": vb}}))
    return a, b


def _compare(*args):
    return subprocess.run(
        [sys.executable, "-m", "eval.compare", *map(str, args)], cwd=REPO, capture_output=True, text=True
    )


def test_compare_two_runs(tmp_path):
    a, b = _runs(tmp_path)
    out = tmp_path / "cmp"
    r = _compare(a, b, "--out", out)
    assert r.returncode == 0, r.stderr
    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run | variant |"))
    assert header == (
        "| run | variant | size (MiB) | wiki perplexity | wiki KL | wiki top-1 | code perplexity | "
        "code KL | code top-1 | cloze acc |"
    )
    # reference before gptq (eval.report.ORDER); blanks where a run lacks a dataset or task
    assert "| alpha | reference | 10.0 | 11.1111 | 0 | 1.0000 |  |  |  | 0.640 ± 0.021 |" in md
    assert "| alpha | gptq | 3.0 | 12.3456 | 0.0123 | 0.9512 |  |  |  | 0.615 ± 0.021 |" in md
    assert "| beta | gptq | 5.0 | 13.5000 | 0.0456 | 0.9000 | 7.2500 |  |  |  |" in md
    assert md.index("| alpha | reference |") < md.index("| alpha | gptq |") < md.index("| beta | gptq |")
    assert "| alpha | " + str(a) + " | passed |" in md
    doc = json.loads((out / "compare.json").read_text())
    assert doc["runs"] == ["alpha", "beta"]
    assert [(x["run"], x["variant"]) for x in doc["rows"]] == [
        ("alpha", "reference"),
        ("alpha", "gptq"),
        ("beta", "gptq"),
    ]
    g = doc["rows"][1]
    assert g["size_bytes"] == 3 * 2**20 and g["size_mib"] == 3.0 and g["perplexity"] == {"wiki": 12.3456}
    assert g["kl_divergence"] == {"wiki": 0.0123} and g["accuracy"]["cloze"]["acc"] == 0.615
    assert doc["rows"][2]["perplexity"] == {"wiki": 13.5, "code": 7.25} and doc["rows"][2]["accuracy"] == {}
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp"))


def test_compare_bad_input(tmp_path):
    a, _ = _runs(tmp_path)
    empty = tmp_path / "no-report"
    empty.mkdir()
    r = _compare(a, empty, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "no-report" in r.stderr and "no report.json" in r.stderr
    assert not (tmp_path / "o1").exists()
    r = _compare("--out", tmp_path / "o2")
    assert r.returncode == 2 and "RUN_DIR" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "report.json").write_text("{not json")
    r = _compare(bad, "--out", tmp_path / "o3")
    assert r.returncode == 2 and "unreadable JSON" in r.stderr and "Traceback" not in r.stderr
    (bad / "report.json").write_text("[1, 2]")
    r = _compare(bad, "--out", tmp_path / "o4")
    assert r.returncode == 2 and "variants" in r.stderr
    r = _compare(a, a, "--out", tmp_path / "o5")
    assert r.returncode == 2 and "twice" in r.stderr


def _frontier(points):
    return {
        "params": 1000,
        "datasets": ["wiki"],
        "chosen": "gptq",
        "points": points,
        "pareto": {"wiki": [p["variant"] for p in points][:1]},
    }


def _point(variant, size, kl, chosen=False):
    return {
        "variant": variant,
        "label": f"{variant} label",
        "kind": "gptq",
        "size_bytes": size,
        "size_mib": size / 2**20,
        "bits_per_param": 8 * size / 1000,
        "bits_per_weight": 4.3125,
        "fp16_modules": 0,
        "setting": None,
        "chosen": chosen,
        "data": "eval",
        "metrics": {
            "wiki": {
                "kl": kl,
                "kl_ci": [kl / 2, kl * 2],
                "top1": 0.9,
                "top1_ci": [0.85, 0.95],
                "perplexity_ratio": 1.1,
                "perplexity_ratio_ci": [1.05, 1.15],
            }
        },
    }


def test_compare_overlays_frontiers(tmp_path):
    a, b = _runs(tmp_path)
    for run, pts in (
        (a, [_point("gptq", 2**20, 0.02, True), _point("rtn", 2**21, 0.05)]),
        (b, [_point("gptq", 3 * 2**20, 0.01, True)]),
    ):
        doc = json.loads((run / "report.json").read_text())
        doc["frontier"] = _frontier(pts)
        (run / "report.json").write_text(json.dumps(doc))
    out = tmp_path / "cmp"
    r = _compare(a, b, "--out", out)
    assert r.returncode == 0, r.stderr
    doc = json.loads((out / "compare.json").read_text())
    assert list(doc["frontiers"]) == ["alpha", "beta"] and len(doc["frontiers"]["alpha"]["points"]) == 2
    md = (out / "compare.md").read_text()
    assert "## Size/quality frontiers" in md
    assert (
        "| alpha | gptq (chosen, pareto) | gptq label | 1.0 | 8388.61 | 0.02 [0.01, 0.04] | 0.9000 [0.8500, 0.9500] |"
        in md
    )
    assert "| alpha | rtn | rtn label | 2.0 |" in md and "| beta | gptq (chosen, pareto) |" in md
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
