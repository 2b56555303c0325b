"""The run configuration: a YAML file validated by pydantic on load.

Sections: ``base``, ``adapter``, ``output`` and one per stage (``dequantize``,
``merge``, ``verify``, ``requantize``, ``eval``). Unknown keys, wrong types and
missing local paths are refused with :class:`InputError` (exit code 2).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

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
    format: Literal["text", "alpaca", "chat"] = Field(
        "text",
        description="alpaca: instruction records (instruction, input, output); chat: chat records "
        "(messages: role/content, or ShareGPT conversations); a JSON list or JSONL, rendered as in "
        "training (see template); every 10th record held out",
    )
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto",
        description="how alpaca/chat records are rendered: the tokenizer's chat template (chat), the "
        "Alpaca prompt (alpaca), or auto: the chat template when the tokenizer has one, else the Alpaca prompt",
    )
    path: Optional[str] = None
    split: Literal["train", "heldout", "all"] = "heldout"
    text_field: str = "text"
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "test"
    max_tokens: Optional[int] = Field(
        None,
        gt=0,
        description="tokens taken from the start of the corpus; default: "
        "what its use needs (calibration: 4 x num_samples x seq_len, verify: "
        "max(1024, 2 x seq_len), eval: max(4096, 8 x seq_len))",
    )

    @model_validator(mode="after")
    def _check(self) -> "TextSource":
        if self.source == "file":
            if not self.path:
                raise ValueError("source 'file' needs 'path'")
        if self.source == "hub" and not self.hub_name:
            raise ValueError("source 'hub' needs 'hub_name'")
        if self.format != "text" and self.source != "file":
            raise ValueError(f"format '{self.format}' reads records from a file: give source 'file' and 'path'")
        return self


class MixPart(TextSource):
    """One part of a calibration mix: a text source and its share of the windows."""

    weight: float = Field(
        1.0, gt=0, allow_inf_nan=False, strict=True, description="share of the calibration windows (normalized)"
    )


class CalibrationMix(_Strict):
    """A calibration set mixed from several text sources (e.g. the adapter's training records and
    generic web text): each part fills its share of the windows with its own whole records."""

    name: str = "mix"
    mix: list[MixPart] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _names(self) -> "CalibrationMix":
        names = [p.name for p in self.mix]
        if len(set(names)) < len(names):
            raise ValueError(f"the parts of a mix need distinct names, got {names}")
        return self


def _calibration_kind(v) -> str:
    """A calibration set with a ``mix`` key is a mix, anything else one text source (so an error
    names the form the user wrote, not both)."""
    if isinstance(v, dict):
        return "mix" if "mix" in v else "source"
    return "mix" if isinstance(v, CalibrationMix) else "source"


Calibration = Annotated[
    Union[Annotated[TextSource, Tag("source")], Annotated[CalibrationMix, Tag("mix")]],
    Discriminator(_calibration_kind),
]


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping that repeats a key (PyYAML keeps the last one
    silently: a second ``requantize:`` section would drop the first)."""


def _unique_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key '{key}' appears twice in the same mapping; keep one", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


class BaseSection(_Strict):
    path: str = Field(..., description="local folder of a HF checkpoint, or a hub id")
    trust_remote_code: bool = False


class WeightedAdapter(_Strict):
    path: str
    weight: float = Field(1.0, allow_inf_nan=False, description="the adapter's weight in the combination")


class CombineSection(_Strict):
    """Several LoRA adapters combined into one with PEFT's ``add_weighted_adapter``."""

    adapters: list[WeightedAdapter] = Field(..., min_length=2)
    method: Literal[
        "linear",
        "cat",
        "svd",
        "ties",
        "ties_svd",
        "dare_linear",
        "dare_ties",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune",
        "magnitude_prune_svd",
    ] = "linear"
    density: Optional[float] = Field(None, gt=0, le=1, description="kept fraction for TIES / DARE / magnitude pruning")
    seed: int = 0

    @model_validator(mode="after")
    def _some_weight(self) -> "CombineSection":
        if all(a.weight == 0 for a in self.adapters):
            raise ValueError("every adapter has weight 0, so the combination is no adapter at all; give a weight")
        return self


class AdapterSection(_Strict):
    path: Optional[str] = Field(None, description="local PEFT adapter folder, or a hub id")
    combine: Optional[CombineSection] = None
    allow_pickle: bool = False

    @model_validator(mode="after")
    def _one(self) -> "AdapterSection":
        if (self.path is None) == (self.combine is None):
            raise ValueError("give exactly one of 'path' (one adapter) or 'combine' (several)")
        if (
            self.combine
            and self.combine.method.startswith(("ties", "dare", "magnitude"))
            and self.combine.density is None
        ):
            raise ValueError(f"combine.method '{self.combine.method}' needs 'density'")
        return self

    @property
    def paths(self) -> list[str]:
        return [self.path] if self.path else [a.path for a in self.combine.adapters]


class OutputSection(_Strict):
    dir: str = "runs"
    run_name: str = Field(
        "run", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="letters, digits, '.', '_', '-'; no slashes"
    )


class DequantizeSection(_Strict):
    """How the base was quantized during QLoRA training (defaults: the QLoRA paper's)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Dtype = "bfloat16"
    quant_storage: Literal["uint8", "bfloat16", "float16", "float32"] = "uint8"
    dtype: Optional[Dtype] = Field(None, description="output dtype; default: the base checkpoint's own dtype")
    save: bool = Field(
        True,
        description="write dequantized/ (the eval 'base' variant needs it; the merge streams "
        "from the base checkpoint itself)",
    )

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        if isinstance(data, dict) and "device" in data:
            raise ValueError("'dequantize.device' moved to 'runtime.device' (auto, cpu or cuda); move the key there")
        return data


class RuntimeSection(_Strict):
    """How to run (not what): the same config gives the same artefacts on any runtime."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="cuda when available under auto, else cpu")
    threads: Optional[int] = Field(None, gt=0, description="torch CPU threads; default: torch's own choice")
    offload: Literal["auto", "on", "off"] = Field(
        "auto",
        description="run verify/evaluate one decoder layer at a time and GPTQ with GPTQModel's disk offload: "
        "on, off, or auto (on when a model in float32 does not fit in half the free memory)",
    )
    shard_size_gb: float = Field(5.0, gt=0, description="size cap of each safetensors shard written (GB)")

    @field_validator("offload", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        """YAML 1.1 reads an unquoted ``on``/``off`` as a boolean: take it as the word written."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class MergeSection(_Strict):
    """``base``: which weights the LoRA delta is added to. ``dequantized`` reproduces the trained
    model; ``original`` adds the same delta to the full-precision weights; ``auto`` keeps the
    one with the lower perplexity on the verify text. Both are measured whenever the base is
    a full-precision checkpoint (``compare_bases``)."""

    base: Literal["dequantized", "original", "auto"] = "dequantized"
    compare_bases: bool = True


class VerifySection(_Strict):
    max_kl: Optional[float] = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="nats/token; default depends on dtype (finite: the gate fails closed)",
    )
    data: TextSource = TextSource(name="verify", split="heldout")
    seq_len: int = Field(512, gt=1)


class RequantizeSection(_Strict):
    enabled: bool = True
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = Field(128, description="-1 for per-channel")
    desc_act: bool = Field(True, description="act-order: quantize columns by decreasing activation (g_idx permuted)")
    act_group_aware: Optional[bool] = Field(
        None, description="GPTQModel's group-aware reordering (sequential g_idx); default: on unless desc_act"
    )
    sym: bool = True
    damp_percent: float = Field(0.01, gt=0, lt=1, description="Hessian dampening, fraction of the mean diagonal")
    damp_auto_increment: float = Field(0.01, ge=0, lt=1, description="damping step when Cholesky fails")
    mse: float = Field(0.0, ge=0, description="MSE scale search: exponent of the error norm (2.4 as in GPTQ); 0 = off")
    gptaq_alpha: Optional[float] = Field(
        None, ge=0, description="GPTAQ (GPTQ v2) with this alpha; None or 0 = plain GPTQ"
    )
    num_samples: int = Field(128, gt=0)
    seq_len: int = Field(2048, gt=1)
    calibration: Calibration = Field(
        TextSource(name="calibration", split="train"),
        description="a text source, or a mix {name, mix: [{<text source>, weight}]}",
    )
    alternatives: list[GPTQSetting] = Field([], description="extra GPTQ checkpoints, evaluated as baselines")
    budget: Optional[BudgetSection] = None

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        return _check_group_size(v)

    @model_validator(mode="after")
    def _used(self) -> "RequantizeSection":
        if not self.enabled and (self.budget is not None or self.alternatives):
            given = " and ".join(k for k in ("budget", "alternatives") if getattr(self, k))
            raise ValueError(
                f"{given} given with enabled: false, so GPTQ never runs them; set enabled: true, or remove them"
            )
        return self


class EvalSection(_Strict):
    datasets: list[TextSource] = Field([TextSource(name="pydoc-heldout", split="heldout")], min_length=1)
    seq_len: int = Field(512, gt=1, description="context length of each perplexity window (tokens)")
    tasks: list[str] = Field(["pydoc_cloze"], description="lm-eval task YAMLs (names in task_dir)")
    task_dir: Optional[str] = None
    task_limit: Optional[int] = Field(None, gt=0)
    task_variants: list[str] = Field(
        ["reference", "merged", "gptq"],
        description="variants that also run the lm-eval tasks (lm-eval dominates evaluate's time on a CPU); "
        "'all' for every variant",
    )
    variants: list[Literal["reference", "merged", "gptq", "base"]] = ["reference", "merged", "gptq", "base"]
    baselines: list[Literal["peft_4bit_merge", "rtn", "bnb_nf4"]] = Field(
        [], description="extra variants built in memory from the merged model or the 4-bit base"
    )
    bootstrap: int = Field(
        2000, ge=1, description="bootstrap resamples for perplexity-ratio intervals (at least 1; 2000 is usual)"
    )
    batch_size: int = Field(16, gt=0, description="lm-eval requests per forward pass")

    @field_validator("task_variants")
    @classmethod
    def _task_variants(cls, v: list[str]) -> list[str]:
        known = {"all", "reference", "merged", "gptq", "base", "peft_4bit_merge", "rtn", "bnb_nf4"}
        bad = [n for n in v if n not in known and not n.startswith(("merged-", "gptq-"))]
        if bad:
            raise ValueError(
                f"unknown variant(s) {bad}: use 'all' or names among {sorted(known - {'all'})}, "
                "'merged-<base>' or a GPTQ alternative's 'gptq-<tag>'"
            )
        return v


class GPTQSetting(_Strict):
    """One GPTQ setting; unset fields take the ``requantize`` section's values."""

    bits: Optional[Literal[2, 3, 4, 8]] = None
    group_size: Optional[int] = None
    desc_act: Optional[bool] = None
    act_group_aware: Optional[bool] = None
    sym: Optional[bool] = None
    damp_percent: Optional[float] = Field(None, gt=0, lt=1)
    mse: Optional[float] = Field(None, ge=0)
    gptaq_alpha: Optional[float] = Field(None, ge=0, description="0: plain GPTQ (off)")
    num_samples: Optional[int] = Field(None, gt=0, description="calibration windows of this setting")
    calibration: Optional[Calibration] = Field(
        None, description="another calibration set for this setting (e.g. C4 only, to compare with a mix)"
    )

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: Optional[int]) -> Optional[int]:
        return v if v is None else _check_group_size(v)


class AllocateSection(_Strict):
    """Per-module precision within the budget: for a setting over budget, keep the quantized modules
    that cost the most loss per byte in 16-bit until the predicted loss is within budget, then measure."""

    sensitivity: Literal["kl", "gptq_loss"] = Field(
        "kl",
        description="kl: KL on calibration windows with only that module quantized (one probe per module); "
        "gptq_loss: GPTQ's own per-module loss (free, on each module's own scale)",
    )
    windows: int = Field(2, gt=0, description="calibration windows the kl probes run on")
    probe_tokens: int = Field(256, gt=1, description="tokens of each window the kl probes run on")
    max_fp16_fraction: float = Field(
        0.25, gt=0, le=1, description="at most this share of the quantized modules' extra 16-bit bytes"
    )
    tries: int = Field(3, gt=0, description="allocations measured per setting (the target is corrected after each)")


class BudgetSection(_Strict):
    """Quality budget: try ``settings`` from the smallest checkpoint to the largest and keep the
    smallest checkpoint whose loss against the reference (on the verify text) is within budget;
    with ``allocate``, a setting over budget is also tried with its most sensitive modules in 16-bit."""

    settings: list[GPTQSetting] = Field(..., min_length=1)
    max_perplexity_increase: Optional[float] = Field(
        None, gt=0, allow_inf_nan=False, description="fraction, e.g. 0.05 for +5%"
    )
    max_kl: Optional[float] = Field(None, gt=0, allow_inf_nan=False, description="nats/token")
    allocate: Optional[AllocateSection] = None
    keep_tries: bool = Field(
        False, description="keep every tried checkpoint as gptq-<tag>/ (evaluated on the eval texts, on the frontier)"
    )

    @model_validator(mode="after")
    def _some(self) -> "BudgetSection":
        if self.max_perplexity_increase is None and self.max_kl is None:
            raise ValueError("give max_perplexity_increase and/or max_kl")
        return self


class Config(_Strict):
    base: BaseSection
    adapter: AdapterSection
    output: OutputSection = OutputSection()
    runtime: RuntimeSection = RuntimeSection()
    dequantize: DequantizeSection = DequantizeSection()
    merge: MergeSection = MergeSection()
    verify: VerifySection = VerifySection()
    requantize: RequantizeSection = RequantizeSection()
    eval: EvalSection = EvalSection()

    @property
    def run_dir(self) -> Path:
        return Path(self.output.dir) / self.output.run_name

    @property
    def layout(self):
        """The run folder's :class:`pipeline.layout.RunLayout`."""
        from pipeline.layout import RunLayout

        return RunLayout(self.run_dir)

    @property
    def effective_adapter(self) -> str:
        """The adapter the run merges: ``adapter.path``, or the combined adapter the merge stage
        writes to ``adapter-combined/`` when ``adapter.combine`` is set."""
        return self.adapter.path or str(self.layout.combined_adapter)

    @property
    def out_dtype(self) -> str:
        """The output dtype: ``dequantize.dtype``, else the base checkpoint's own dtype (its
        ``bnb_4bit_compute_dtype`` for a base saved in 4-bit), else float16."""
        if self.dequantize.dtype:
            return self.dequantize.dtype
        from pipeline.checkpoint import stored_dtype

        return stored_dtype(self.base.path) or "float16"

    def text_sources(self) -> list[tuple[str, TextSource]]:
        """Every text source of the config with its key, e.g. ``("eval.datasets[0]", src)``."""
        rq = self.requantize
        cals = [("requantize.calibration", rq.calibration)]
        cals += [(f"requantize.alternatives[{i}].calibration", a.calibration) for i, a in enumerate(rq.alternatives)]
        cals += [
            (f"requantize.budget.settings[{i}].calibration", a.calibration)
            for i, a in enumerate(rq.budget.settings if rq.budget else [])
        ]
        out = [("verify.data", self.verify.data)]
        for key, cal in cals:
            if isinstance(cal, CalibrationMix):
                out += [(f"{key}.mix[{i}]", p) for i, p in enumerate(cal.mix)]
            elif cal is not None:
                out.append((key, cal))
        return out + [(f"eval.datasets[{i}]", d) for i, d in enumerate(self.eval.datasets)]


def is_hub_id(s: str) -> bool:
    """True for a string of the hub's ``owner/name`` form (not a relative or absolute path)."""
    return bool(_HUB_ID.match(s)) and not s.startswith((".", "/"))


def _resolve(value: str, root: Path, key: str, allow_absent: bool = False) -> str:
    """A model path from the config: an existing local path (relative paths are taken against the
    config file's folder ``root``), else a hub id of the ``owner/name`` form.

    Raises:
        InputError: neither; or a hub id while ``HF_HUB_OFFLINE=1``. The message says where it looked.
    """
    p = Path(value).expanduser()
    local = Path(os.path.normpath(p if p.is_absolute() else (root / p)))
    if local.exists():
        return str(local.resolve())
    if allow_absent:
        return value if is_hub_id(value) else str(local)
    if not is_hub_id(value):
        raise InputError(
            f"{key}: '{value}' is not a local path (looked for '{local}', relative paths are taken "
            "against the config file's folder) and not a hub id (owner/name). Fix the path in the "
            "config, or run `make demo` for the demo files."
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise InputError(
            f"{key}: '{value}' is not a local path (looked for '{local}') and, taken as a hub id, "
            "cannot be fetched: HF_HUB_OFFLINE=1 forbids the hub. Point it at a local folder."
        )
    return value


def _resolve_paths(cfg: Config, root: Path, allow_absent: bool = False) -> Config:
    """``cfg`` with every relative path taken against ``root`` (the config file's folder); model
    paths absent here are refused unless ``allow_absent``."""

    def local(value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        p = Path(value).expanduser()
        return os.path.normpath(p if p.is_absolute() else root / p)

    cfg.base.path = _resolve(cfg.base.path, root, "base.path", allow_absent)
    if cfg.adapter.path:
        cfg.adapter.path = _resolve(cfg.adapter.path, root, "adapter.path", allow_absent)
    for i, a in enumerate(cfg.adapter.combine.adapters if cfg.adapter.combine else []):
        a.path = _resolve(a.path, root, f"adapter.combine.adapters[{i}].path", allow_absent)
    cfg.output.dir = local(cfg.output.dir)
    cfg.eval.task_dir = local(cfg.eval.task_dir)
    for _, src in cfg.text_sources():
        src.path = local(src.path)
    return cfg


def check_text_files(cfg: Config) -> None:
    """Refuse a ``source: file`` text source whose file is missing.

    Raises:
        InputError: naming the config key and the file.
    """
    for key, s in cfg.text_sources():
        if s.source == "file" and not os.path.isfile(s.path):
            raise InputError(f"{key} (text source '{s.name}'): file '{s.path}' not found.")


def load_config(path: str | os.PathLike, overrides: Optional[dict] = None, check_paths: bool = True) -> Config:
    """Read and validate a YAML config.

    Relative paths in the file (models, text files, ``output.dir``, ``eval.task_dir``) are
    taken relative to the config file's folder. A model path that is not a local path is
    taken as a hub id only if it has the ``owner/name`` form.

    ``check_paths=False`` reads a config meant for another machine (a GPU host, a hub user):
    its paths are resolved the same way but may be absent here.

    Raises:
        InputError: file missing, not YAML, unknown key, a moved key, wrong type, or a path
            that does not exist (the message names the key and what to do).
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file '{p}' not found. Pass CONFIG=configs/<name>.yaml.")
    try:
        with open(p, encoding="utf-8") as fh:
            raw = yaml.load(fh, Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
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
            where = err["loc"]  # without the tag of the calibration form (source or mix) pydantic inserts
            loc = ".".join(
                str(x)
                for i, x in enumerate(where)
                if not (i and where[i - 1] == "calibration" and x in ("source", "mix"))
            )
            msg = (
                "unknown key (check spelling; see README config reference)"
                if err["type"] == "extra_forbidden"
                else err["msg"].removeprefix("Value error, ")
            )
            lines.append(f"  {loc}: {msg}")
        raise InputError(f"config '{p}' is invalid:\n" + "\n".join(lines)) from None
    cfg = _resolve_paths(cfg, p.resolve().parent, allow_absent=not check_paths)
    if check_paths:
        check_text_files(cfg)
    return cfg
