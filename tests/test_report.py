"""The whole pipeline through the CLI on a tiny model: one process per stage, and a
report.json that holds the contract other runs are compared on."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import yaml

from helpers import REPO, tiny_config


def test_cli_run_writes_report_with_contract(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={"alternatives": [{"bits": 8}]},
        eval={"baselines": ["peft_4bit_merge", "rtn", "bnb_nf4"], "bootstrap": 200},
    )
    cfile = tmp_path / "tiny.yaml"
    cfile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfile)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rd = cfg.run_dir
    rep = json.loads((rd / "report.json").read_text())
    assert set(rep["variants"]) == {
        "reference",
        "merged",
        "merged-original",
        "merged-dequantized",
        "gptq",
        "gptq-8bit-g32-act",
        "base",
        "peft_4bit_merge",
        "rtn",
        "bnb_nf4",
    } - {"merged-" + rep["verification"]["merge_base"]}
    for v in rep["variants"]:
        var = rep["variants"][v]
        for k in ("perplexity", "kl_divergence", "top1_agreement"):
            assert set(var[k]) == {"pydoc-heldout"}, (v, k)
        assert set(var["accuracy"]) == {"pydoc_cloze"} and var["accuracy"]["pydoc_cloze"]["n"] == 8
        a = var["accuracy"]["pydoc_cloze"]
        assert 0 < a["forward_seconds"] <= a["seconds"], (v, a)  # lm-eval's time, split: model forwards
        assert var["size_bytes"] > 0 and var["path"]
    v = rep["variants"]
    assert v["reference"]["kl_divergence"]["pydoc-heldout"] == 0.0
    assert v["merged"]["kl_divergence"]["pydoc-heldout"] < 1e-6
    assert v["merged"]["top1_agreement"]["pydoc-heldout"] == 1.0
    # the adapter moved the model, GPTQ lost something, both measured against the reference
    assert v["base"]["kl_divergence"]["pydoc-heldout"] > 1e-2
    assert v["gptq"]["kl_divergence"]["pydoc-heldout"] > 1e-4
    assert abs(v["merged"]["perplexity"]["pydoc-heldout"] / v["reference"]["perplexity"]["pydoc-heldout"] - 1) < 1e-4
    assert rep["verification"]["passed"] is True and rep["verification"]["kl_divergence"] < 1e-6
    # both merge bases measured side by side, each exact against its own unmerged model
    cands = rep["verification"]["candidates"]
    assert set(cands) == {"dequantized", "original"} and all(c["exact_kl"] < 1e-6 for c in cands.values())
    assert rep["verification"]["merge_base"] == "dequantized"
    assert cands["original"]["kl_divergence"] > 1e-4  # the original weights are not what the adapter saw
    assert v["merged-original"]["kl_divergence"]["pydoc-heldout"] > 1e-4
    # statistics against the reference
    pr = v["gptq"]["perplexity_ratio"]["pydoc-heldout"]
    assert pr["ci_low"] <= pr["ratio"] <= pr["ci_high"]
    assert v["gptq"]["perplexity"]["pydoc-heldout"] / v["reference"]["perplexity"]["pydoc-heldout"] == __import__(
        "pytest"
    ).approx(pr["ratio"], rel=1e-9)
    pa = v["gptq"]["accuracy_paired"]["pydoc_cloze"]
    assert pa["n"] == 8 and 0 <= pa["p_value"] <= 1
    # baselines: PEFT's 4-bit merge rounds the adapter away; 8-bit GPTQ is closer than 4-bit
    assert v["peft_4bit_merge"]["kl_divergence"]["pydoc-heldout"] > 100 * v["merged"]["kl_divergence"]["pydoc-heldout"]
    assert v["bnb_nf4"]["kl_divergence"]["pydoc-heldout"] > 1e-4
    assert v["gptq-8bit-g32-act"]["kl_divergence"]["pydoc-heldout"] < v["gptq"]["kl_divergence"]["pydoc-heldout"]
    card = (rd / "gptq" / "README.md").read_text()
    assert "GPTQ (GPTQModel) 4-bit, group size 32" in card and "What it lost" in card
    for s in ("dequantize", "merge", "verify", "requantize", "evaluate"):
        assert rep["stages"][s]["seconds"] > 0 and rep["stages"][s]["peak_rss_bytes"] > 50 * 2**20, s
        assert rep["stages"][s]["status"] == "ok"
    assert rep["config"]["requantize"]["group_size"] == 32
    assert rep["versions"]["peft"] and rep["versions"]["gptqmodel"]
    md = (rd / "report.md").read_text()
    assert "| GPTQ (reloaded) |" in md and "passed" in md
    assert re.search(r"Forward passes [\d.]+ s of the stage's [\d.]+ s \([\d.]+x; perplexity/KL [\d.]+ s, lm-eval", md)
    assert (rd / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _check_frontier(rep, rd)
    assert not list(rd.glob(".*partial")) and not list(rd.glob("reference-logprobs-*"))


def _check_frontier(rep, rd):
    """The size/quality frontier in report.json: one point per way of storing the fine-tune, its
    numbers those of the variant, sizes in bits per parameter, the chosen checkpoint, the Pareto set."""
    import math

    from pipeline.checkpoint import Checkpoint

    fr = rep["frontier"]
    params = sum(t.numel for t in Checkpoint(rd / "merged").tensors.values())
    assert fr["params"] == params and fr["datasets"] == ["pydoc-heldout"] and fr["chosen"] == "gptq"
    pts = {p["variant"]: p for p in fr["points"]}
    assert set(pts) == {"reference", "merged", "gptq", "gptq-8bit-g32-act", "rtn", "bnb_nf4", "peft_4bit_merge"}
    kinds = {k: p["kind"] for k, p in pts.items()}
    assert kinds == {
        "reference": "reference",
        "merged": "float",
        "gptq": "gptq",
        "gptq-8bit-g32-act": "gptq",
        "rtn": "rtn",
        "bnb_nf4": "bnb_nf4",
        "peft_4bit_merge": "peft_4bit_merge",
    }
    sizes = [p["size_bytes"] for p in fr["points"]]
    assert sizes == sorted(sizes)  # smallest first
    for name, p in pts.items():
        v = rep["variants"][name]
        assert set(p) >= {"label", "size_mib", "bits_per_param", "bits_per_weight", "chosen", "data", "metrics"}
        assert p["size_bytes"] == v["size_bytes"] and p["data"] == "eval"
        assert math.isclose(p["bits_per_param"], 8 * v["size_bytes"] / params)
        m = p["metrics"]["pydoc-heldout"]
        assert m["kl"] == v["kl_divergence"]["pydoc-heldout"] and m["top1"] == v["top1_agreement"]["pydoc-heldout"]
        if name != "reference":
            assert m["kl_ci"][0] <= m["kl"] <= m["kl_ci"][1] and m["top1_ci"][0] <= m["top1"] <= m["top1_ci"][1]
            pr = v["perplexity_ratio"]["pydoc-heldout"]
            assert m["perplexity_ratio"] == pr["ratio"] and m["perplexity_ratio_ci"] == [pr["ci_low"], pr["ci_high"]]
    assert pts["gptq"]["chosen"] and not any(p["chosen"] for k, p in pts.items() if k != "gptq")
    assert pts["gptq"]["bits_per_weight"] == 4 + 20 / 32 and pts["gptq-8bit-g32-act"]["bits_per_weight"] == 8 + 24 / 32
    assert pts["rtn"]["bits_per_weight"] == 4 + 20 / 32 and pts["gptq"]["fp16_modules"] == 0
    assert pts["gptq"]["label"] == "GPTQ 4-bit g32 (act-order)"
    # Pareto: walking up in size, each member is closer (KL) than every smaller point
    par = fr["pareto"]["pydoc-heldout"]
    kl = {k: p["metrics"]["pydoc-heldout"]["kl"] for k, p in pts.items()}
    assert par[-1] == "reference" or kl[par[-1]] == min(kl.values())
    for k, p in pts.items():
        smaller = [q for q in pts if pts[q]["size_bytes"] < p["size_bytes"]]
        assert (k in par) == all(kl[k] < kl[q] for q in smaller), k
    # every GPTQ checkpoint's bits per module, read from its tensors
    mb = rep["module_bits"]["gptq"]
    assert mb["counts"] == {"4": 14} and mb["fp16"] == [] and len(mb["modules"]) == 14
    md = (rd / "report.md").read_text()
    assert "## Size/quality frontier" in md and "| **gptq** (chosen)" in md
    assert "## Calibration" in md and "## Bits per module" in md
    assert (rd / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (rd / "gptq" / "README.md").read_text()
    assert "**Bits per module**: decoder linear modules: 14 at 4-bit." in card
