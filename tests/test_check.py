"""The start-of-run check settles everything knowable before the first stage: text sizes against
the windows asked of them, group sizes against layer widths, lm-eval tasks, context length,
the output folder and free disk. Each problem exits 2 naming the key and both numbers, and
nothing is written."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from helpers import REPO, tiny_config
from pipeline import check
from pipeline.config import Config, load_config
from pipeline.errors import InputError


def _cli(cfg, tmp_path, *args):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", *args, "--config", str(f)], cwd=REPO, capture_output=True, text=True
    )
    return r, time.monotonic() - t0


def test_too_small_calibration_fails_at_the_start(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={"calibration": {"name": "small", "split": "train", "max_tokens": 300}},
    )
    r, seconds = _cli(cfg, tmp_path, "run")
    assert r.returncode == 2, r.stderr[-2000:]
    assert (
        "requantize.calibration (text source 'small') gives 300 tokens, fewer than requantize.num_samples x "
        "seq_len = 4 x 128 = 512"
    ) in r.stderr
    assert "Traceback" not in r.stderr
    assert not cfg.run_dir.exists()  # refused before anything was written or any model loaded
    assert seconds < 60  # the check tokenizes text only; the whole process (imports included) is short


def test_default_calibration_takes_what_it_needs(tiny_base, tiny_adapter, tmp_path):
    """No max_tokens: the calibration text takes what num_samples x seq_len needs (the bug of
    issue 7 was a 4096-token default under a 16 x 512 request)."""
    cfg = tiny_config(
        tiny_base, tiny_adapter, tmp_path / "runs", requantize={"num_samples": 16, "seq_len": 512, "group_size": 32}
    )
    out = check.check_run(cfg)
    assert out["stages"] == ["dequantize", "merge", "verify", "requantize", "evaluate"]
    from pipeline.models import load_tokenizer
    from pipeline.textdata import calibration_windows

    rows = calibration_windows(load_tokenizer(tiny_base, cfg), cfg.requantize.calibration, 16, 512)
    assert len(rows) == 16 and all(len(r["input_ids"]) <= 512 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) > 0.9 * 16 * 512  # whole topics packed, windows nearly full


@pytest.mark.parametrize(
    "section,needle",
    [
        ({"requantize": {"group_size": 128}}, "requantize.group_size 128 does not divide layer width(s) [64]"),
        (
            {"requantize": {"alternatives": [{"group_size": 256}]}},
            "requantize.alternatives[0].group_size 256 does not divide layer width(s) [64, 128]",
        ),
        (
            {"requantize": {"budget": {"max_kl": 0.1, "settings": [{"bits": 8}, {"group_size": 128}]}}},
            "requantize.budget.settings[1].group_size 128 does not divide",
        ),
        ({"eval": {"tasks": ["no_such_task"]}}, "eval task 'no_such_task': no "),
        ({"eval": {"seq_len": 1024}}, "eval.seq_len = 1024 is longer than the base's context length 512"),
        (
            {"verify": {"data": {"max_tokens": 100}}},
            "verify.data (text source 'text') gives 100 tokens, fewer than one window of verify.seq_len = 128",
        ),
    ],
)
def test_problems_are_named(section, needle, tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs", **section)
    with pytest.raises(InputError, match="start-of-run check") as e:
        check.check_run(cfg)
    assert needle in str(e.value)


def test_only_what_the_stages_need_is_checked(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs", requantize={"group_size": 128})
    with pytest.raises(InputError, match="group_size 128"):
        check.check_run(cfg, ["requantize", "evaluate"])
    assert check.check_run(cfg, ["evaluate"])["stages"] == ["evaluate"]


def test_free_disk_is_checked_against_the_plan(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")
    need = check.check_run(cfg)["plan"]["disk_peak_bytes"]
    assert need > 0
    monkeypatch.setattr(check, "free_bytes", lambda run_dir: need // 2)
    with pytest.raises(
        InputError,
        match=r"output.dir: the run will write about [\d.]+ GB in '.*runs/tiny' but only "
        r"[\d.]+ GB are free there",
    ):
        check.check_run(cfg)


@pytest.mark.parametrize(
    "stages,needle",
    [
        (["merge", "dequantize"], "out of order"),
        (["verfy"], "unknown stage(s) ['verfy']"),
        (["merge", "merge"], "names a stage twice"),
    ],
)
def test_stages_are_validated(stages, needle):
    with pytest.raises(InputError, match="--stages") as e:
        check.check_stages(stages)
    assert needle in str(e.value)


def test_cli_stages_typo_exits_2(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")
    r, _ = _cli(cfg, tmp_path, "run", "--stages", "evaluate", "verify")
    assert r.returncode == 2 and "out of order" in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output_folder(tiny_base, tiny_adapter, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        cfg = tiny_config(tiny_base, tiny_adapter, ro / "sub")
        import os

        if os.access(ro, os.W_OK):
            pytest.skip("running as a user that can write a read-only folder (root)")
        with pytest.raises(InputError, match="cannot be written"):
            check.check_run(cfg)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """Every shipped config validates; those whose inputs are absent here are checked with their
    paths allowed to be absent, and the check says what it skipped. (The slow integration tests
    run the full check on the demo configs once their inputs are built.)"""
    cfg = load_config(path, check_paths=False)
    assert isinstance(cfg, Config)
    out = check.check_run(cfg, allow_absent=True)
    if "llama-7b" in path.name:  # a hub base meant for a GPU host: said so, not silently passed
        assert any("meta-llama/Llama-2-7b-hf" in s for s in out["skipped"])


def test_gptq_settings_that_would_share_a_folder_are_refused(tiny_base, tiny_adapter, tmp_path):
    """Two alternatives that are the same setting (or that the folder name cannot tell apart:
    mse 2.4 and 2.4000001 both give '-mse2.4'), or an alternative that repeats the main setting,
    would write one gptq-<tag>/ twice: refused at the start, naming both keys."""
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={"group_size": 32, "alternatives": [{"mse": 2.4}, {"mse": 2.4000001}, {}]},
    )
    with pytest.raises(InputError) as e:
        check.check_run(cfg)
    msg = str(e.value)
    assert "requantize.alternatives[0] and requantize.alternatives[1] would both write gptq-4bit-g32-act-mse2.4/" in msg
    assert "requantize.alternatives[2] is the main requantize setting itself" in msg
    assert not cfg.run_dir.exists()


def test_an_alternatives_own_num_samples_is_named(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(
        tiny_base,
        tiny_adapter,
        tmp_path / "runs",
        requantize={"group_size": 32, "alternatives": [{"bits": 8, "num_samples": 100000}]},
    )
    with pytest.raises(InputError, match=r"fewer than requantize\.alternatives\[0\]\.num_samples x seq_len = 100000"):
        check.check_run(cfg)


def test_mix_weights_must_be_finite_numbers_and_huge_ones_still_split(tmp_path):
    from pipeline.config import CalibrationMix
    from pipeline.textdata import window_shares

    part = {"source": "embedded", "split": "train"}
    for bad, why in ((float("inf"), "finite"), ("0.5", "valid number"), (True, "valid number"), (0, "greater than 0")):
        with pytest.raises(ValueError, match=why):
            CalibrationMix(name="m", mix=[{"name": "a", **part, "weight": bad}, {"name": "b", **part}])
    huge = CalibrationMix(
        name="m", mix=[{"name": "a", **part, "weight": 1e308}, {"name": "b", **part, "weight": 1e308}]
    )
    assert window_shares(huge, 16) == [8, 8]


def test_empty_output_dir_is_refused(tiny_base, tiny_adapter, tmp_path):
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")
    r, _ = _cli(cfg, tmp_path, "run", "--output-dir", "")
    assert r.returncode == 2 and "--output-dir is empty" in r.stderr and "Traceback" not in r.stderr
    assert not cfg.run_dir.exists()


def test_base_transformers_cannot_load_is_named(tiny_base, tiny_adapter, tmp_path):
    """A base whose config.json names no architecture transformers knows, or that has no weights:
    exit-2 errors at the start, not a traceback from the first stage."""
    import json
    import shutil

    for name, edit, needle in (
        ("arch", lambda d: {**d, "model_type": "nonexistent_arch"}, "transformers cannot read its config.json"),
        (
            "nomt",
            lambda d: {k: v for k, v in d.items() if k != "model_type"},
            "transformers cannot read its config.json",
        ),
        ("noweights", None, "has config.json but no weight files"),
    ):
        b = shutil.copytree(tiny_base, tmp_path / name)
        if edit:
            (b / "config.json").write_text(json.dumps(edit(json.loads((b / "config.json").read_text()))))
        else:
            (b / "model.safetensors").unlink()
        cfg = tiny_config(b, tiny_adapter, tmp_path / "runs")
        with pytest.raises(InputError, match=needle):
            check.check_run(cfg, stages=["requantize", "evaluate"])  # the adapter check is not what refuses


def test_setting_problems_and_offline_hub_texts(tiny_base, tiny_adapter, tmp_path, monkeypatch):
    cfg = tiny_config(
        tiny_base, tiny_adapter, tmp_path / "runs", requantize={"desc_act": True, "act_group_aware": True}
    )
    with pytest.raises(InputError, match="requantize: act_group_aware: true with desc_act: true"):
        check.check_run(cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = {"name": "wt", "source": "hub", "hub_name": "wikitext", "hub_config": "wikitext-2-raw-v1"}
    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs", verify={"data": hub})
    with pytest.raises(InputError, match="hub dataset 'wikitext' cannot be fetched: HF_HUB_OFFLINE=1"):
        check.check_run(cfg)
