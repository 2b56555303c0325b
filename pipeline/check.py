"""The start-of-run check: everything the config and the input headers decide, settled before
the first stage, so that no run fails after minutes of work on something knowable at the start.

``python -m pipeline check --config C`` runs it alone; ``run`` runs it first. It reads
configs, safetensors headers and tokenizers, and tokenizes each text once; it never loads
model weights. Each failure is an :class:`~pipeline.errors.InputError` (exit code 2) naming
the key, the number found and the number needed. It also returns the plan
(:mod:`pipeline.plan`): what the run will write and hold in memory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline import gptq
from pipeline.adapter_checks import check_adapter
from pipeline.checkpoint import AdapterFiles, Checkpoint
from pipeline.errors import InputError
from pipeline.layout import STAGE_NAMES


def context_length(config: dict) -> int | None:
    """The trained context length a ``config.json`` declares (``max_position_embeddings``,
    ``n_positions``, ...), or None when it declares none."""
    for c in (config, config.get("text_config") or {}):
        for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(c.get(k), int):
                return c[k]
    return None


def check_stages(stages: list[str] | None) -> list[str]:
    """The stages to run, validated: known names, no repeats, pipeline order.

    Raises:
        InputError: an unknown name (with the choices), a repeat, or stages out of order.
    """
    if not stages:
        return list(STAGE_NAMES)
    unknown = [s for s in stages if s not in STAGE_NAMES]
    if unknown:
        raise InputError(f"--stages: unknown stage(s) {unknown}; choose from {list(STAGE_NAMES)} (in that order).")
    if len(set(stages)) < len(stages):
        raise InputError(f"--stages: {stages} names a stage twice.")
    if stages != sorted(stages, key=STAGE_NAMES.index):
        raise InputError(f"--stages: {stages} are out of order; the pipeline order is {list(STAGE_NAMES)}.")
    return list(stages)


def _tokenizer_source(cfg) -> str:
    for p in cfg.adapter.paths:
        if Path(p).exists() and AdapterFiles(p, cfg.adapter.allow_pickle).tokenizer_saved:
            return p
    return cfg.base.path


def _token_counts(cfg, needs: list[tuple], skipped: list[str]) -> list[str]:
    """Tokenize each needed text once and compare with what its use needs.

    ``needs``: (key, source, tokens needed, what needs them, tokens to take[, "records"]); with
    ``"records"`` the text is counted as calibration packs it (its records tokenized one by one)."""
    from pipeline.models import load_tokenizer
    from pipeline.textdata import record_tokens, token_stream

    tok = load_tokenizer(_tokenizer_source(cfg), cfg)
    problems, counted = [], {}
    for key, src, need, what, take, *how in needs:
        if src.source == "hub":
            if _hub_offline():
                problems.append(
                    f"{key}: hub dataset '{src.hub_name}' cannot be fetched: HF_HUB_OFFLINE=1 forbids the hub. "
                    "Point it at a local file (source: file, path: ...), or run online."
                )
                continue
            skipped.append(f"{key}: hub dataset '{src.hub_name}' is counted when its stage loads it")
            continue
        if src.source == "file" and not Path(src.path).is_file():
            skipped.append(f"{key}: file '{src.path}' is not here")
            continue
        ident = (src.model_dump_json(exclude={"name", "max_tokens", "weight"}), take, tuple(how))
        if ident not in counted:
            if how:
                counted[ident] = sum(map(len, record_tokens(tok, src, take)))
            else:
                counted[ident] = len(token_stream(tok, src, take))
        n = counted[ident]
        if n < need:
            problems.append(
                f"{key} (text source '{src.name}') gives {n} tokens, fewer than {what} = {need}; "
                "give more text (max_tokens, a larger file) or lower the windows."
            )
    return problems


def _hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (``HF_HUB_OFFLINE`` or
    ``HF_DATASETS_OFFLINE`` set to a true value)."""
    import os

    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _folder_problems(rq) -> list[str]:
    """Two GPTQ settings that would write the same ``gptq-<tag>/`` folder (identical settings, or
    settings the folder name does not tell apart), an alternative that repeats the main setting, or
    a setting asking for both act-order and group-aware reordering."""
    problems, seen = [], {}
    for key, s in gptq.settings_to_check(rq)[1:]:
        folder = f"gptq-{gptq.tag(s, rq)}/"
        if folder in seen:
            problems.append(
                f"{seen[folder]} and {key} would both write {folder}: remove one, or make them differ in bits, "
                "group_size, desc_act, sym, mse, gptaq_alpha, damp_percent, num_samples or calibration (by name)."
            )
        else:
            seen[folder] = key
        if key.startswith("requantize.alternatives") and not rq.budget and s == rq:
            problems.append(f"{key} is the main requantize setting itself (already written to gptq/): remove it.")
    for key, s in gptq.settings_to_check(rq):
        if s.desc_act and s.act_group_aware:
            problems.append(
                f"{key}: act_group_aware: true with desc_act: true; GPTQModel orders columns by one or the "
                "other. Set desc_act: false to use act_group_aware, or drop act_group_aware."
            )
    return problems


def _calibration_needs(key: str, cal, rq, problems: list[str], setting: str = "requantize") -> list[tuple]:
    """What a calibration set (one source or a mix) needs of each of its parts; ``setting`` is the
    config key of the GPTQ setting whose ``num_samples`` and ``seq_len`` ask for it."""
    from pipeline.textdata import calibration_parts, max_tokens_for, window_shares

    try:
        shares = window_shares(cal, rq.num_samples, f"{setting}.num_samples")
    except InputError as e:
        problems.append(f"{key}: {e}")
        return []
    parts = calibration_parts(cal)
    mixed = hasattr(cal, "mix")
    return [
        (
            f"{key}.mix[{i}]" if mixed else key,
            src,
            n * rq.seq_len,
            f"{setting}.num_samples x seq_len = {n} x {rq.seq_len}" + (" (its share of the mix)" if mixed else ""),
            max_tokens_for(src, "calibration", rq.seq_len, n),
            "records",
        )
        for i, ((src, _), n) in enumerate(zip(parts, shares))
    ]


def _text_needs(cfg, stages: list[str], problems: list[str]) -> list[tuple]:
    from pipeline.textdata import max_tokens_for

    rq, v, e = cfg.requantize, cfg.verify, cfg.eval
    needs = []
    if "verify" in stages or ("requantize" in stages and rq.enabled and rq.budget):
        needs.append(
            (
                "verify.data",
                v.data,
                v.seq_len,
                "one window of verify.seq_len",
                max_tokens_for(v.data, "verify", v.seq_len),
            )
        )
    if "requantize" in stages and rq.enabled:
        seen = set()
        for key, s in gptq.settings_to_check(rq):  # every setting's calibration set, each counted once
            ident = (s.calibration.model_dump_json(), s.num_samples, s.seq_len)
            if ident in seen:
                continue
            seen.add(ident)
            own = key != "requantize" and s.calibration != rq.calibration
            asks = "requantize" if (s.num_samples, s.seq_len) == (rq.num_samples, rq.seq_len) else key
            needs += _calibration_needs(
                f"{key}.calibration" if own else "requantize.calibration", s.calibration, s, problems, asks
            )
    if "evaluate" in stages:
        needs += [
            (f"eval.datasets[{i}]", d, e.seq_len, "one window of eval.seq_len", max_tokens_for(d, "eval", e.seq_len))
            for i, d in enumerate(e.datasets)
        ]
    return needs


def _context_problems(cfg, config: dict, stages: list[str]) -> list[str]:
    ctx = context_length(config)
    if ctx is None:
        return []
    keys = []
    if "verify" in stages:
        keys.append(("verify.seq_len", cfg.verify.seq_len))
    if "requantize" in stages and cfg.requantize.enabled:
        keys.append(("requantize.seq_len", cfg.requantize.seq_len))
    if "evaluate" in stages:
        keys.append(("eval.seq_len", cfg.eval.seq_len))
    return [
        f"{k} = {n} is longer than the base's context length {ctx} (config.json); lower it to at most {ctx}."
        for k, n in keys
        if n > ctx
    ]


def _base_problem(cfg, base: Checkpoint) -> str | None:
    """Why the base cannot be loaded at all (``transformers`` does not know its config, or it has
    no weight files), or None."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base.folder, trust_remote_code=cfg.base.trust_remote_code)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return (
            f"base '{cfg.base.path}': transformers cannot read its config.json ({first}). base.path must be "
            "a checkpoint of an architecture the installed transformers knows (config.json with its "
            "model_type), or set base.trust_remote_code for one with custom code."
        )
    if not base.files:
        return (
            f"base '{cfg.base.path}' has config.json but no weight files (*.safetensors). Download the "
            "checkpoint's weights into that folder."
        )
    return None


def _group_problems(cfg, base: Checkpoint | None) -> list[str]:
    if base is None:
        return []
    from transformers import AutoConfig
    from pipeline.bnb4 import conv1d_names

    conv = conv1d_names(AutoConfig.from_pretrained(base.folder, trust_remote_code=cfg.base.trust_remote_code))
    widths = gptq.linear_in_features(base.shapes(), conv)
    return [
        f"{key}.{p}"
        for key, s in gptq.settings_to_check(cfg.requantize)
        if (p := gptq.group_size_problem(widths, s.group_size))
    ]


_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


def _config_vs_weights(cfg, base: Checkpoint) -> list[str]:
    """Compare the parameter shapes ``config.json`` implies (the model built on the meta device,
    no weights) with the shapes in the safetensors headers; one problem naming the sizes when
    they disagree. Architectures that cannot be built here are not compared."""
    from transformers import AutoConfig

    from pipeline.lora import build_skeleton

    try:
        config = AutoConfig.from_pretrained(base.folder, trust_remote_code=cfg.base.trust_remote_code)
        expected = {n: tuple(p.shape) for n, p in build_skeleton(config).named_parameters()}
    except Exception:  # noqa: BLE001 - an architecture this transformers cannot build: loading will say
        return []
    stored = base.shapes()
    wrong = [(n, stored[n], s) for n, s in expected.items() if n in stored and stored[n] != s]
    shared = sum(n in stored for n in expected)
    missing = [n for n in expected if n not in stored] if shared >= len(expected) / 2 else []
    if not wrong and not missing:
        return []
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = ", ".join(f"{k} {getattr(text, k)}" for k in _SIZE_KEYS if getattr(text, k, None) is not None)
    lines = [f"'{n}' is {list(w)} in the weights, config.json implies {list(e)}" for n, w, e in wrong[:3]]
    if missing:
        lines.append(f"{len(missing)} tensor(s) config.json implies are not in the weights, e.g. '{missing[0]}'")
    return [
        f"base.path: config.json ({sizes}, num_hidden_layers {getattr(text, 'num_hidden_layers', '?')}) disagrees "
        f"with the weights in {base.folder}: " + "; ".join(lines) + ". Fix config.json (or re-download the "
        "checkpoint): loading would fail or leave weights random."
    ]


def _writable_folder(run_dir: Path) -> list[str]:
    p = run_dir
    while not p.exists():
        p = p.parent
    why = None if p.is_dir() else "not a folder"
    if why is None:
        try:  # a real probe: access() says yes to root on read-only or pseudo file systems (/proc)
            import tempfile

            os.rmdir(tempfile.mkdtemp(prefix=".qlora-merge-probe-", dir=p))
        except OSError as e:
            why = e.strerror or type(e).__name__
    if why:
        return [f"output folder '{run_dir}' cannot be written ('{p}': {why}); set output.dir to a writable folder."]
    return []


def free_bytes(run_dir: Path) -> int:
    """Free bytes on the file system that holds (or will hold) ``run_dir``."""
    p = run_dir
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def check_run(cfg, stages: list[str] | None = None, allow_absent: bool = False) -> dict:
    """Settle everything knowable before the first stage.

    Args:
        stages: the stages that will run (default all); only what they need is checked.
        allow_absent: check a config meant for another machine: model paths that are absent
            here (a hub id offline, a GPU host's folder) are skipped, and the result says so.

    Returns:
        ``{"stages", "plan", "skipped"}``: the plan (:func:`pipeline.plan.plan`) and what could
        not be checked here, with the reason.
    Raises:
        InputError: naming every problem found (key, number found, number needed).
    """
    from pipeline.plan import plan

    stages = check_stages(stages)
    problems, skipped = [], []
    local_base = Path(cfg.base.path).exists()
    local_adapters = all(Path(p).exists() for p in cfg.adapter.paths)
    base = None
    if local_base:
        base = Checkpoint(cfg.base.path)
    elif allow_absent:
        skipped.append(f"base '{cfg.base.path}' is not here: its headers, widths and context length were not checked")
    else:
        base = Checkpoint(cfg.base.path)  # a hub id: resolved (downloaded or cached) once
    if local_adapters or not allow_absent:
        if {"dequantize", "merge"} & set(stages):
            check_adapter(cfg)
    else:
        skipped.append(f"adapter(s) {cfg.adapter.paths} are not here: the adapter was not checked")
    problems += _writable_folder(cfg.run_dir)
    if "requantize" in stages and cfg.requantize.enabled:
        problems += _folder_problems(cfg.requantize)
    if base is not None:
        if (bad := _base_problem(cfg, base)) is not None:
            raise InputError(bad)  # nothing below can be checked without a loadable config and weights
        problems += _config_vs_weights(cfg, base)
        problems += _context_problems(cfg, base.config, stages)
        if "requantize" in stages and cfg.requantize.enabled:
            problems += _group_problems(cfg, base)
        problems += _token_counts(cfg, _text_needs(cfg, stages, problems), skipped)
    elif allow_absent:
        skipped.append("text sources were not counted (no tokenizer here)")
    if "evaluate" in stages:
        from eval.accuracy import task_config

        for t in cfg.eval.tasks:
            try:
                task_config(t, cfg.eval.task_dir)
            except InputError as e:
                problems.append(str(e))
    the_plan = plan(cfg, stages, base) if base is not None else None
    if the_plan is not None:
        free = free_bytes(cfg.run_dir)
        if the_plan["disk_peak_bytes"] > free:
            problems.append(
                f"output.dir: the run will write about {the_plan['disk_peak_bytes'] / 1e9:.2f} GB in "
                f"'{cfg.run_dir}' but only {free / 1e9:.2f} GB are free there; free space or set output.dir "
                "to a larger disk."
            )
    if problems:
        raise InputError("the start-of-run check found problems:\n  " + "\n  ".join(problems))
    return {"stages": stages, "plan": the_plan, "skipped": skipped}
