"""Run-time mistakes end with exit code 2 and a message naming the key, and a re-run never
leaves the previous run's artefacts looking current."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import REPO, tiny_config
from pipeline import dequantize, merge, requantize, verify
from pipeline.errors import InputError
from pipeline.layout import RunLayout


def _cli(cfg, tmp_path, *args):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--config", str(f)], cwd=REPO, capture_output=True, text=True
    )


def test_stages_out_of_order_exit_2(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")
    for stage, needle in (
        ("verify", "run the merge stage first"),
        ("evaluate", "run the merge and verify stages first"),
    ):
        r = _cli(cfg, tmp_path, "stage", stage)
        assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, (stage, r.stderr[-500:])


def test_text_shorter_than_a_window_names_the_key(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path, verify={"seq_len": 100000})
    dequantize.run(cfg)
    merge.run(cfg)
    with pytest.raises(
        InputError, match=r"verify.data: text '.*' gives \d+ tokens, fewer than one window of seq_len=100000"
    ):
        verify.run(cfg)


def test_calibration_too_small_for_num_samples(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path)
    dequantize.run(cfg)
    merge.run(cfg)
    verify.run(cfg)
    big = cfg.model_copy(update={"requantize": cfg.requantize.model_copy(update={"num_samples": 100000})})
    with pytest.raises(
        InputError, match=r"fewer than requantize.num_samples x seq_len = 100000 x 128; lower them \(at most \d+"
    ):
        requantize.run(big)
    assert not (cfg.run_dir / "gptq").exists()


def test_rerun_clears_the_outputs_it_will_rewrite(tmp_path):
    rd = tmp_path / "run"
    for d in ("dequantized", "merged", "merged-original", "gptq", "gptq-8bit-g64", "stages"):
        (rd / d).mkdir(parents=True)
    for f in ("report.json", "report.md", "stages/merge.json", "stages/dequantize.json", "stages/evaluate.json"):
        (rd / f).write_text("{}")
    RunLayout(rd).clear("merge")
    left = sorted(p.relative_to(rd).as_posix() for p in rd.rglob("*"))
    assert left == ["dequantized", "stages", "stages/dequantize.json"]
