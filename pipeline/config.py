"""The run configuration: a YAML file validated by pydantic on load.

Sections: ``base``, ``adapter``, ``output`` and one per stage (``dequantize``,
``merge``, ``verify``, ``requantize``, ``eval``). Unknown keys, wrong types and
missing local paths are refused with :class:`InputError` (exit code 2).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import InputError

Dtype = Literal["float16", "bfloat16", "float32"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _check_group_size(v: int) -> int:
    if v != -1 and (v <= 0 or v & (v - 1)):
        raise ValueError("group_size must be -1 or a power of two (32, 64, 128, ...)")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextSource(_Strict):
    """A text corpus: the embedded default (``pydoc_data.topics``), a local file or a hub dataset.

    ``source: embedded`` splits the CPython topics by topic name into ``train`` and
    ``heldout`` (every fifth topic in sorted order is held out). A local ``.txt`` file
    is read whole; a ``.jsonl`` file is read one JSON object per line, field ``text_field``.
    ``source: hub`` loads ``hub_name`` with the ``datasets`` library (needs network).
    """

    name: str = "text"
    source: Literal["embedded", "file", "hub"] = "embedded"
    format: Literal["text", "alpaca"] = Field("text", description="alpaca: a JSON list of instruction records, "
                                              "rendered with the training prompt; split every 10th record held out")
    path: Optional[str] = None
    split: Literal["train", "heldout", "all"] = "heldout"
    text_field: str = "text"
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "test"
    max_tokens: int = Field(4096, gt=0, description="tokens taken from the start of the corpus")

    @model_validator(mode="after")
    def _check(self) -> "TextSource":
        if self.source == "file":
            if not self.path:
                raise ValueError("source 'file' needs 'path'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("source 'hub' needs 'hub_name'")
        return self


class BaseSection(_Strict):
    path: str = Field(..., description="local folder of a HF checkpoint, or a hub id")
    trust_remote_code: bool = False


class WeightedAdapter(_Strict):
    path: str
    weight: float = 1.0


class CombineSection(_Strict):
    """Several LoRA adapters combined into one with PEFT's ``add_weighted_adapter``."""

    adapters: list[WeightedAdapter] = Field(..., min_length=2)
    method: Literal["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                    "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"] = "linear"
    density: Optional[float] = Field(None, gt=0, le=1, description="kept fraction for TIES / DARE / magnitude pruning")
    seed: int = 0


class AdapterSection(_Strict):
    path: Optional[str] = Field(None, description="local PEFT adapter folder, or a hub id")
    combine: Optional[CombineSection] = None
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one(self) -> "AdapterSection":
        if (self.path is None) == (self.combine is None):
            raise ValueError("give exactly one of 'path' (one adapter) or 'combine' (several)")
        if self.combine and self.combine.method.startswith(("ties", "dare", "magnitude")) and self.combine.density is None:
            raise ValueError(f"combine.method '{self.combine.method}' needs 'density'")
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if self.path else [a.path for a in self.combine.adapters]


class OutputSection(_Strict):
    dir: str = "runs"
    run_name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                          description="letters, digits, '.', '_', '-'; no slashes")


class DequantizeSection(_Strict):
    """How the base was quantized during QLoRA training (defaults: the QLoRA paper's)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    dtype: Optional[Dtype] = Field(None, description="output dtype; default: the base checkpoint's own dtype")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class MergeSection(_Strict):
    """``base``: which weights the LoRA delta is added to. ``dequantized`` reproduces the trained
    model; ``original`` adds the same delta to the full-precision weights; ``auto`` keeps the
    one with the lower perplexity on the verify text. Both are measured whenever the base is
    a full-precision checkpoint (``compare_bases``)."""

    base: Literal["dequantized", "original", "auto"] = "dequantized"
    compare_bases: bool = True


class VerifySection(_Strict):
    max_kl: Optional[float] = Field(None, gt=0, description="nats/token; default depends on dtype")
    data: TextSource = TextSource(name="verify", split="heldout", max_tokens=1024)
    seq_len: int = Field(512, gt=1)


class RequantizeSection(_Strict):
    enabled: bool = True
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 for per-channel")
    desc_act: bool = True
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1)
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(2048, gt=1)
    calibration: TextSource = TextSource(name="calibration", split="train", max_tokens=10**9)
    alternatives: list[GPTQSetting] = Field([], description="extra GPTQ checkpoints, evaluated as baselines")
    budget: Optional[BudgetSection] = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return _check_group_size(v)


class EvalSection(_Strict):
    enabled: bool = True
    datasets: list[TextSource] = Field([TextSource(name="pydoc-heldout", split="heldout")], min_length=1)
    seq_len: int = Field(512, gt=1, description="context length of each perplexity window (tokens)")
    tasks: list[str] = ["pydoc_cloze"]
    task_dir: Optional[str] = None
    task_limit: Optional[int] = Field(None, gt=0)
    variants: list[Literal["reference", "merged", "gptq", "base"]] = ["reference", "merged", "gptq", "base"]
    baselines: list[Literal["peft_4bit_merge", "rtn", "bnb_nf4"]] = Field(
        [], description="extra variants built in memory from the merged model or the 4-bit base")
    bootstrap: int = Field(2000, ge=0, description="bootstrap resamples for perplexity-ratio intervals")
    batch_size: int = Field(8, gt=0)


class GPTQSetting(_Strict):
    """One GPTQ setting; unset fields take the ``requantize`` section's values."""

    bits: Optional[Literal[2, 3, 4, 8]] = None
    group_size: Optional[int] = None
    desc_act: Optional[bool] = None
    sym: Optional[bool] = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: Optional[int]) -> Optional[int]:
        return v if v is None else _check_group_size(v)


class BudgetSection(_Strict):
    """Quality budget: try ``settings`` from the smallest checkpoint to the largest and keep the
    first whose loss against the reference (on the verify text) is within budget."""

    settings: list[GPTQSetting] = Field(..., min_length=1)
    max_perplexity_increase: Optional[float] = Field(None, gt=0, description="fraction, e.g. 0.05 for +5%")
    max_kl: Optional[float] = Field(None, gt=0, description="nats/token")

    @model_validator(mode="after")
    def _some(self) -> "BudgetSection":
        if self.max_perplexity_increase is None and self.max_kl is None:
            raise ValueError("give max_perplexity_increase and/or max_kl")
        return self


class Config(_Strict):
    base: BaseSection
    adapter: AdapterSection
    output: OutputSection = OutputSection()
    dequantize: DequantizeSection = DequantizeSection()
    merge: MergeSection = MergeSection()
    verify: VerifySection = VerifySection()
    requantize: RequantizeSection = RequantizeSection()
    eval: EvalSection = EvalSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.run_name

    @property
    def out_dtype(self) -> str:
        """The output dtype: ``dequantize.dtype``, else the base's ``config.json`` dtype, else float16."""
        if self.dequantize.dtype:
            return self.dequantize.dtype
        f = Path(self.base.path) / "config.json"
        if f.is_file():
            import json
            c = json.loads(f.read_text())
            d = str(c.get("dtype") or c.get("torch_dtype") or "")
            if c.get("quantization_config", {}).get("bnb_4bit_compute_dtype"):
                d = c["quantization_config"]["bnb_4bit_compute_dtype"]
            if d in ("float16", "bfloat16", "float32"):
                return d
        return "float16"


def _is_hub_id(s: str) -> bool:
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/"))


def _check_paths(cfg: Config) -> None:
    for what, p in (("base.path", cfg.base.path), *(("adapter.path", a) for a in cfg.adapter.paths)):
        if not os.path.exists(p) and not _is_hub_id(p):
            raise InputError(f"{what}: '{p}' is neither an existing folder nor a hub id (owner/name). "
                             "Fix the path in the config, or run `make demo` for the demo files.")
        if not os.path.exists(p) and os.environ.get("HF_HUB_OFFLINE") == "1":
            raise InputError(f"{what}: '{p}' does not exist locally and HF_HUB_OFFLINE=1 forbids the hub. "
                             "Point it at a local folder.")
    sources = [cfg.verify.data, cfg.requantize.calibration, *cfg.eval.datasets]
    for s in sources:
        if s.source == "file" and not os.path.isfile(s.path):
            raise InputError(f"text source '{s.name}': file '{s.path}' not found.")


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None) -> Config:
    """Read and validate a YAML config.

    Relative paths in the file are taken relative to the current directory (the repo
    root when run through ``make``).

    Raises:
        InputError: file missing, not YAML, unknown key, wrong type, or a path that
            does not exist (the message names the key and what to do).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file '{p}' not found. Pass CONFIG=configs/<name>.yaml.")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"config '{p}' is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise InputError(f"config '{p}' must be a YAML mapping with sections base, adapter, output, ...")
    for k, v in (overrides or {}).items():
        raw[k] = {**raw.get(k, {}), **v}
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key (check spelling; see README config reference)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise InputError(f"config '{p}' is invalid:\n" + "\n".join(lines)) from None
    _check_paths(cfg)
    return cfg
