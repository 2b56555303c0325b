"""Bad configs are refused with a message that names the problem, and exit code 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import REPO
from pipeline.config import load_config
from pipeline.errors import InputError


def _write(tmp_path, body: str):
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(body))
    return p


GOOD = """
base: {{path: {base}}}
adapter: {{path: {adapter}}}
output: {{dir: {out}, run_name: t}}
"""


def _good(tmp_path, tiny_base, tiny_adapter, extra=""):
    return _write(tmp_path, GOOD.format(base=tiny_base, adapter=tiny_adapter, out=tmp_path / "runs") + extra)


def test_valid_config_loads_with_qlora_defaults(tmp_path, tiny_base, tiny_adapter):
    cfg = load_config(_good(tmp_path, tiny_base, tiny_adapter))
    assert (cfg.dequantize.quant_type, cfg.dequantize.double_quant, cfg.dequantize.compute_dtype) == (
        "nf4",
        True,
        "bfloat16",
    )
    assert cfg.run_dir == tmp_path / "runs" / "t"


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("dequantize: {quant_typo: nf4}\n", "dequantize.quant_typo: unknown key"),
        ("colour: blue\n", "colour: unknown key"),
        ("requantize: {bits: four}\n", "requantize.bits"),
        ("requantize: {group_size: 100}\n", "group_size must be -1 or a power of two"),
        ("dequantize: {quant_type: int3}\n", "dequantize.quant_type"),
        ("dequantize: {device: cuda}\n", "'dequantize.device' moved to 'runtime.device'"),
        ("eval: {enabled: true}\n", "eval.enabled: unknown key"),
        ("eval: {datasets: [{name: x, source: file, path: /nonexistent.txt}]}\n", "file '/nonexistent.txt' not found"),
        ("requantize: {enabled: false, budget: {max_kl: 0.1, settings: [{}]}}\n", "budget given with enabled: false"),
        ("requantize: {enabled: false, alternatives: [{bits: 8}]}\n", "alternatives given with enabled: false"),
        ("verify: {max_kl: .inf}\n", "verify.max_kl: Input should be a finite number"),
        (
            "requantize: {budget: {max_kl: .nan, settings: [{}]}}\n",
            "requantize.budget.max_kl: Input should be a finite",
        ),
        ("eval: {task_variants: [reference, mergd]}\n", "eval.task_variants: unknown variant"),
        ("requantize: {bits: 4}\nrequantize: {bits: 8}\n", "key 'requantize' appears twice"),
    ],
)
def test_bad_values_are_named(tmp_path, tiny_base, tiny_adapter, extra, needle):
    with pytest.raises(InputError, match=needle.replace("(", r"\(")):
        load_config(_good(tmp_path, tiny_base, tiny_adapter, extra))


def test_missing_path_and_missing_section(tmp_path, tiny_adapter):
    p = _write(tmp_path, f"base: {{path: ./no/such/base}}\nadapter: {{path: {tiny_adapter}}}\n")
    with pytest.raises(
        InputError,
        match=r"base.path: './no/such/base' is not a local path \(looked for '.*no/such/base'.*"
        r"and not a hub id",
    ):
        load_config(p)
    with pytest.raises(InputError, match="adapter: Field required"):
        load_config(_write(tmp_path, "base: {path: x}\n"))
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "absent.yaml")


def test_cli_exit_code_2_and_message(tmp_path, tiny_base, tiny_adapter):
    p = _good(tmp_path, tiny_base, tiny_adapter, "verify: {max_kl: -1}\n")
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--config", str(p)], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 2
    assert "verify.max_kl: Input should be greater than 0" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing written for a refused config


@pytest.mark.parametrize("written,taken", [("on", "on"), ("off", "off"), ('"on"', "on"), ("auto", "auto")])
def test_runtime_offload_on_off_unquoted(tmp_path, tiny_base, tiny_adapter, written, taken):
    """YAML 1.1 reads an unquoted on/off as a boolean; the README writes `offload: on`."""
    cfg = load_config(_good(tmp_path, tiny_base, tiny_adapter, f"runtime:\n  offload: {written}\n"))
    assert cfg.runtime.offload == taken
