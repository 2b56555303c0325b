"""Unsupported input is refused clearly (issue 3, item 4): InputError / exit code 2, a message
that says what is wrong and what to do, and nothing written.

``pipeline.adapter_checks.check_adapter`` reads configs and safetensors headers only; these tests
build tiny bases and adapters (with PEFT itself) and hand-made broken files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from helpers import REPO, make_adapter, make_llama, tiny_config
from pipeline.adapter_checks import check_adapter
from pipeline.errors import InputError

PFX = "base_model.model."


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory):
    """Adapters trained on other tiny Llamas: narrower (hidden 32) and deeper (3 layers)."""
    root = tmp_path_factory.mktemp("other")
    narrow = make_adapter(make_llama(root / "b32", hidden=32), root / "a32")
    deep = make_adapter(make_llama(root / "b3", layers=3), root / "a3")
    return {"narrow": narrow, "deep": deep}


def _check(base, adapter, tmp_path, base_opts=None, adapter_opts=None):
    """check_adapter on the tiny config; ``*_opts`` set keys of the base / adapter sections
    (``tiny_config``'s own ``base``/``adapter`` parameters shadow those sections)."""
    cfg = tiny_config(base, adapter, tmp_path / "runs")
    cfg = cfg.model_copy(
        update={
            "base": cfg.base.model_copy(update=base_opts or {}),
            "adapter": cfg.adapter.model_copy(update=adapter_opts or {}),
        }
    )
    return check_adapter(cfg)


def _copy(src, dst, config_edit=None, name="config.json"):
    """Copy a checkpoint/adapter folder, optionally editing one of its JSON files."""
    shutil.copytree(src, dst)
    if config_edit:
        f = dst / name
        f.write_text(json.dumps(config_edit(json.loads(f.read_text()))))
    return dst


def _crafted(tmp_path, tiny_adapter, extra: dict):
    """The tiny adapter with extra tensors written into its safetensors file."""
    dst = _copy(tiny_adapter, tmp_path / "crafted")
    sd = load_file(dst / "adapter_model.safetensors")
    sd.update(extra)
    save_file(sd, dst / "adapter_model.safetensors")
    return dst


def test_good_adapter_passes_with_facts(tmp_path, tiny_base, tiny_adapter):
    facts = _check(tiny_base, tiny_adapter, tmp_path)
    assert {
        k: facts[k]
        for k in ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "modules_to_save", "resized_vocab")
    } == {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": [],
        "resized_vocab": None,
    }
    assert len(facts["adapted_modules"]) == 14  # 2 layers x 7 projections
    assert "model.layers.1.mlp.down_proj" in facts["adapted_modules"]


def test_dora_rslora_and_modules_to_save_pass(tmp_path, tiny_base):
    a = make_adapter(tiny_base, tmp_path / "a", use_dora=True, use_rslora=True, modules_to_save=["lm_head"])
    facts = _check(tiny_base, a, tmp_path)
    assert (facts["use_dora"], facts["use_rslora"], facts["modules_to_save"]) == (True, True, ["lm_head"])


def test_bias_all_adapter_on_a_base_with_biases_passes(tmp_path):
    base = make_llama(tmp_path / "b", bias=True)
    facts = _check(base, make_adapter(base, tmp_path / "a", bias="all"), tmp_path)
    assert len(facts["adapted_modules"]) == 14
    assert len(facts["trained_biases"]) == 14 and facts["modules_to_save"] == []


def test_bnb_4bit_saved_base_shapes_from_quant_state(tmp_path, tiny_base, tiny_adapter):
    """A base saved in bnb 4-bit stores packed [n, 1] weights; the real shape is in its quant state."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    m = AutoModelForCausalLM.from_pretrained(
        tiny_base,
        device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
    )
    m.save_pretrained(tmp_path / "b4")
    assert len(_check(tmp_path / "b4", tiny_adapter, tmp_path)["adapted_modules"]) == 14


@pytest.mark.parametrize("kind", ["prompt_tuning", "ia3"])
def test_peft_type_not_mergeable(tmp_path, tiny_base, kind):
    from peft import IA3Config, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    pcfg = (
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        if kind == "prompt_tuning"
        else IA3Config(
            task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base), pcfg).save_pretrained(tmp_path / kind)
    with pytest.raises(
        InputError,
        match=rf"PEFT type '{kind.upper()}', which cannot be merged.*only LoRA adapters "
        r"\(including rsLoRA and DoRA\)",
    ):
        _check(tiny_base, tmp_path / kind, tmp_path)


def test_shape_mismatch_names_first_tensor_and_both_shapes(tmp_path, tiny_base, other_bases):
    with pytest.raises(
        InputError,
        match=r"adapter tensor 'base_model\.model\.model\.layers\.0\.\S+\.lora_A\.weight' "
        r"has shape \[8, 64\], which does not fit base tensor "
        r"'model\.layers\.0\.\S+\.weight' of shape \[64, 128\].*different model",
    ):
        _check(tiny_base, other_bases["narrow"], tmp_path)


def test_full_tensor_shape_mismatch(tmp_path, tiny_base, tiny_adapter):
    a = _crafted(tmp_path, tiny_adapter, {PFX + "lm_head.weight": torch.zeros(384, 32)})
    with pytest.raises(
        InputError,
        match=r"'base_model\.model\.lm_head\.weight' has shape \[384, 32\].*"
        r"'lm_head\.weight' of shape \[384, 64\]",
    ):
        _check(tiny_base, a, tmp_path)


def test_resized_vocabulary_allowed_for_embeddings_only(tmp_path, tiny_base, tiny_adapter):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_base)
    m.resize_token_embeddings(400)
    get_peft_model(
        m, LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    ).save_pretrained(tmp_path / "resized")
    facts = _check(tiny_base, tmp_path / "resized", tmp_path)
    assert facts["resized_vocab"] == 400
    assert facts["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    # more rows in any other full tensor is a mismatch
    a = _crafted(tmp_path, tiny_adapter, {PFX + "model.layers.0.input_layernorm.weight": torch.ones(80)})
    with pytest.raises(InputError, match=r"input_layernorm\.weight' has shape \[80\].*of shape \[64\]"):
        _check(tiny_base, a, tmp_path)


def test_module_missing_from_base(tmp_path, tiny_base, other_bases):
    with pytest.raises(InputError, match=r"targets module 'model\.layers\.2\.\S+', which the base does not have"):
        _check(tiny_base, other_bases["deep"], tmp_path)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_non_bnb_quantized_base(tmp_path, tiny_base, tiny_adapter, method):
    b = _copy(tiny_base, tmp_path / "b", lambda c: {**c, "quantization_config": {"quant_method": method, "bits": 4}})
    with pytest.raises(InputError, match=rf"quantized with {method}, not bitsandbytes 4-bit.*Point base\.path at"):
        _check(b, tiny_adapter, tmp_path)


def _no_config(d):
    (d / "adapter_config.json").unlink()


def _bad_json(d):
    (d / "adapter_config.json").write_text("{peft_type: LORA")


def _no_weights(d):
    (d / "adapter_model.safetensors").unlink()


def _garbage(d):
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)


def _truncated(d):
    f = d / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _edit_config(**changes):
    def edit(d):
        f = d / "adapter_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **changes}))

    return edit


@pytest.mark.parametrize(
    "breakage,needle",
    [
        (_no_config, r"adapter_config\.json' is missing\. adapter\.path must be the folder PEFT"),
        (_bad_json, r"adapter_config\.json' is not valid JSON"),
        (_no_weights, r"has no adapter_model\.safetensors \(nor adapter_model\.bin\)"),
        (_garbage, r"adapter_model\.safetensors' is not a readable safetensors file.*Re-download or re-save it"),
        (_truncated, r"adapter_model\.safetensors' is not a readable safetensors file"),
        # a config that does not describe its own tensors: PEFT failed only after dequantize, with a traceback
        (_edit_config(r=0), r"adapter_config\.json has r = 0; a LoRA rank is a positive integer"),
        (_edit_config(r=3), r"has rank \d+ but adapter_config\.json gives 3 for module 'model\.layers\.0\."),
        (_edit_config(rank_pattern={"q_proj": 2}), r"gives 2 for module 'model\.layers\.\d\.self_attn\.q_proj'"),
        (_edit_config(target_modules=["nonexistent_proj"]), r"target_modules \['nonexistent_proj'\] select none of them"),
    ],
)
def test_broken_adapter_files(tmp_path, tiny_base, tiny_adapter, breakage, needle):
    a = _copy(tiny_adapter, tmp_path / "a")
    breakage(a)
    with pytest.raises(InputError, match=needle):
        _check(tiny_base, a, tmp_path)


def test_pickle_adapter_needs_allow_pickle(tmp_path, tiny_base, tiny_adapter):
    a = _copy(tiny_adapter, tmp_path / "a")
    torch.save(load_file(a / "adapter_model.safetensors"), a / "adapter_model.bin")
    (a / "adapter_model.safetensors").unlink()
    with pytest.raises(
        InputError,
        match=r"only a pickle adapter_model\.bin, refused: unpickling can run arbitrary "
        r"code.*weights_only=True.*save_file.*adapter\.allow_pickle: true",
    ):
        _check(tiny_base, a, tmp_path)
    assert len(_check(tiny_base, a, tmp_path, adapter_opts={"allow_pickle": True})["adapted_modules"]) == 14


def test_custom_code_base_needs_trust_remote_code(tmp_path, tiny_base, tiny_adapter):
    auto_map = {"AutoConfig": "cfg.TinyConfig", "AutoModelForCausalLM": "model.TinyForCausalLM"}
    b = _copy(tiny_base, tmp_path / "b", lambda c: {**c, "model_type": "tiny_custom", "auto_map": auto_map})
    with pytest.raises(InputError, match=r"needs its own modelling code.*set base\.trust_remote_code: true"):
        _check(b, tiny_adapter, tmp_path)
    assert _check(b, tiny_adapter, tmp_path, base_opts={"trust_remote_code": True})["peft_type"] == "LORA"
    # an auto_map left in the config of a model transformers implements itself loads without that code
    b2 = _copy(tiny_base, tmp_path / "b2", lambda c: {**c, "auto_map": auto_map})
    assert _check(b2, tiny_adapter, tmp_path)["peft_type"] == "LORA"


def test_combined_adapters_are_each_checked(tmp_path, tiny_base, tiny_adapter, other_bases):
    from pipeline.config import CombineSection, WeightedAdapter

    cfg = tiny_config(tiny_base, tiny_adapter, tmp_path / "runs")

    def combine(*paths):
        section = CombineSection(adapters=[WeightedAdapter(path=str(p)) for p in paths])
        return cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"path": None, "combine": section})})

    facts = check_adapter(combine(tiny_adapter, tiny_adapter))
    assert [len(f["adapted_modules"]) for f in facts["adapters"]] == [14, 14]
    with pytest.raises(InputError, match="does not fit base tensor"):
        check_adapter(combine(tiny_adapter, other_bases["narrow"]))


def test_hub_ids_are_left_to_peft(tmp_path, tiny_base, tiny_adapter):
    assert _check(tiny_base, "someone/some-adapter", tmp_path) == {}
    assert _check("someone/some-base", tiny_adapter, tmp_path)["resized_vocab"] is None


def _cli_merge(tmp_path, base, adapter):
    cfg = tiny_config(base, adapter, tmp_path / "runs")
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "stage", "merge", "--config", str(y)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return r, cfg.run_dir


@pytest.mark.parametrize(
    "which,needle",
    [
        ("narrow", r"which does not fit base tensor 'model\.layers\.0\.\S+' of shape \[64, 128\]"),
        ("prompt_tuning", r"is of PEFT type 'PROMPT_TUNING'"),
    ],
)
def test_cli_merge_refuses_with_exit_2_and_writes_nothing(tmp_path, tiny_base, other_bases, which, needle):
    if which == "prompt_tuning":
        from peft import PromptTuningConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_base),
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
        ).save_pretrained(tmp_path / "pt")
        adapter = tmp_path / "pt"
    else:
        adapter = other_bases[which]
    r, run_dir = _cli_merge(tmp_path, tiny_base, adapter)
    assert r.returncode == 2, r.stderr[-2000:]
    assert re.search(needle, r.stderr), r.stderr[-2000:]
    written = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    assert set(written) <= {"stages"}, written  # at most the stage record, no (partial) artefact
