"""Scale benchmark (issue 10): the streaming stages on synthetic checkpoints with the real shapes
of Llama-3.1-8B and Llama-3-70B, against this machine's own limits (``make bench-scale``).

What it does, in order:

1. Measures the machine's limits: disk write and read speed (``O_DIRECT``, no page cache),
   bitsandbytes NF4 ``quantize_4bit`` / ``dequantize_4bit`` throughput on a 4096 x 14336 bf16
   tensor (double quantization, as the bench config), and float32 matmul throughput.
2. Checks free disk first: the largest model needs about 3x its size (base, merged, one more).
3. For each model: writes a synthetic checkpoint tensor by tensor (random bf16 N(0, 0.02),
   sharded safetensors + index, ``config.json``, a small BPE tokenizer; vocabulary 128256)
   and an all-linear r=16 LoRA adapter (PEFT format, non-zero A and B, ``lora_alpha`` 32);
   runs the pipeline's stages on it, each in its own process (``run_all(cfg, [stage])``), with
   the inputs dropped from the page cache before each stage (``posix_fadvise(DONTNEED)``);
   records per stage the stage's own seconds and peak RSS (``stages/<stage>.json``), the
   child's storage bytes read and written (``getrusage(RUSAGE_CHILDREN)``: ``ru_inblock``,
   ``ru_oublock``) and GB/s; then removes the model (unless ``--keep``).

   Models: ``8b`` (32 layers) and ``70b-4l`` (the 70B shape cut to 4 layers): dequantize (with
   ``dequantize.save: false``: the merge streams the reconstruction itself), merge
   (``compare_bases: false``) and verify (``runtime.offload: on``, 1024 tokens in windows of
   512); ``8b-2l`` and ``70b-2l`` (2-layer slices): the same plus GPTQ (``requantize``).
   Per-layer figures come from the difference of the 4- and 2-layer runs of each shape.
4. Measures the memory of the skeleton with the adapter attached for 4 and 80 layers of the
   70B shape (what grows with the layer count in merge and verify), and projects the full
   70B (80 layers) from the per-layer figures.
5. Writes ``<out>/bench.json`` and ``<out>/bench.md``: every figure with its ratio to its limit,
   and whether the targets of issue 10 are met.

Usage: ``python -m pipeline.bench_scale [--out runs/bench-scale] [--keep] [--skip-70b]
[--skip-gptq] [--small]`` (``--small``: the same run on small shapes, for development; seconds).
A benchmark, never a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
VOCAB = 128256
SHAPES = {  # the real shapes
    "8b": {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "vocab": VOCAB},
    "70b": {"hidden": 8192, "intermediate": 28672, "heads": 64, "kv_heads": 8, "vocab": VOCAB},
}
SMALL_SHAPES = {  # --small: the same run in seconds
    "8b": {"hidden": 512, "intermediate": 1792, "heads": 8, "kv_heads": 2, "vocab": 32000},
    "70b": {"hidden": 1024, "intermediate": 3584, "heads": 16, "kv_heads": 2, "vocab": 32000},
}
FULL_LAYERS = {"8b": 32, "70b": 80}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STAGES_FULL = ["dequantize", "merge", "verify"]
STAGES_GPTQ = ["dequantize", "merge", "verify", "requantize"]
TARGETS = {  # issue 10 (GB = 1e9 bytes)
    "8b_dequantize_merge_rss": 4 * GB,
    "8b_dequantize_merge_time_ratio": 1.5,
    "8b_verify_rss": 6 * GB,
    "70b_layer_rss": 6 * GB,
    "70b_merge_seconds": 3600,
    "70b_merge_rss": 8 * GB,
}


# --- limits of this machine ------------------------------------------------------------------------


def disk_speed(folder: Path, size_bytes: int = 2 * 2**30, block: int = 64 * 2**20) -> dict:
    """Sequential write and read speed (bytes/s) of the disk under ``folder`` with ``O_DIRECT``
    (no page cache), ``block``-sized requests, the file removed afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".disk-probe"
    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(1 << 20) * (block >> 20))
    n = max(1, size_bytes // block)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        t0 = time.perf_counter()
        try:
            for _ in range(n):
                os.write(fd, buf)
            os.fsync(fd)
        finally:
            os.close(fd)
        write_s = time.perf_counter() - t0
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        t0 = time.perf_counter()
        try:
            while os.readv(fd, [buf]) > 0:
                pass
        finally:
            os.close(fd)
        read_s = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
        buf.close()
    return {"disk_write_bps": n * block / write_s, "disk_read_bps": n * block / read_s, "probe_bytes": n * block}


def nf4_speed(shape=(14336, 4096), repeats: int = 3) -> dict:
    """bitsandbytes ``quantize_4bit`` and ``dequantize_4bit`` throughput (elements/s, best of
    ``repeats``) on a bf16 tensor of ``shape`` (N(0, 0.02)), NF4 with double quantization,
    blocksize 64: the per-tensor work of the merge; and float32 matmul throughput (FLOP/s)."""
    import torch
    import bitsandbytes.functional as F

    w = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
    kw = dict(blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    F.quantize_4bit(w[:64].contiguous(), **kw)  # warm up
    q = dq = q_cpu = math.inf
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        packed, state = F.quantize_4bit(w, **kw)
        q, q_cpu = min(q, time.perf_counter() - t0), min(q_cpu, time.process_time() - c0)
        t0 = time.perf_counter()
        F.dequantize_4bit(packed, state)
        dq = min(dq, time.perf_counter() - t0)
    a, b = torch.randn(2048, 4096), torch.randn(4096, 4096)
    a @ b
    mm = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        mm = min(mm, time.perf_counter() - t0)
    return {
        "nf4_quantize_per_s": w.numel() / q,
        "nf4_quantize_per_cpu_s": w.numel() / q_cpu,  # per CPU-second: independent of the machine's load
        "nf4_dequantize_per_s": w.numel() / dq,
        "nf4_probe_shape": list(shape),
        "fp32_matmul_flops": 2 * 2048 * 4096 * 4096 / mm,
        "torch_threads": torch.get_num_threads(),
    }


# --- synthetic checkpoints -------------------------------------------------------------------------


def tokenizer(vocab: int = 4096):
    """A small byte-level BPE trained on the embedded pydoc texts (ids < ``vocab``; the model's
    vocabulary is larger, as a tokenizer smaller than the embedding matrix is allowed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.textdata import embedded_topics

    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(embedded_topics("train"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def llama_config(shape: dict, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=layers,
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        dtype="bfloat16",
    )


def base_shapes(shape: dict, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama checkpoint, in the order transformers saves them."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    kv = h // shape["heads"] * shape["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _flush_and_drop(folder: Path) -> None:
    """fsync every file under ``folder`` and drop it from the page cache (the next reader reads the disk)."""
    for f in Path(folder).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def write_base(folder: Path, shape: dict, layers: int, seed: int = 0, shard_gb: float = 5.0) -> dict:
    """A synthetic bf16 Llama checkpoint at ``folder``, written one tensor at a time (2-D weights
    N(0, 0.02), norms 1), as size-capped shards + index, with ``config.json`` and a tokenizer.

    Returns:
        ``{"bytes", "params", "quantized"}`` (quantized: elements of the decoder layers' linear weights).
    """
    import torch

    from pipeline.checkpoint import ShardWriter

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, int(shard_gb * GB))
    params = quantized = 0
    for name, s in base_shapes(shape, layers):
        if len(s) == 1:
            t = torch.ones(s, dtype=torch.bfloat16)
        else:
            t = torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            quantized += t.numel() if ".layers." in name else 0
        params += t.numel()
        writer.add(name, t)
        del t
    writer.finish()
    llama_config(shape, layers).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    _flush_and_drop(folder)
    return {"bytes": writer.total_bytes, "params": params, "quantized": quantized}


def write_adapter(folder: Path, shape: dict, layers: int, r: int = 16, alpha: int = 32, seed: int = 1) -> dict:
    """An all-linear LoRA adapter in PEFT's format at ``folder`` (``adapter_config.json`` +
    ``adapter_model.safetensors``, float32), non-zero: A ~ N(0, 1/in), B ~ N(0, 0.01^2)."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, s in base_shapes(shape, layers):
        mod = name.removesuffix(".weight")
        if not mod.endswith(PROJECTIONS):
            continue
        out_f, in_f = s
        key = f"base_model.model.{mod}"
        sd[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)
        sd[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=gen) * 0.01
    save_file(sd, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(PROJECTIONS), task_type="CAUSAL_LM"
    ).save_pretrained(str(folder))
    _flush_and_drop(folder)
    return {"bytes": sum(t.numel() * t.element_size() for t in sd.values()), "tensors": len(sd)}


def write_config(path: Path, base: Path, adapter: Path, runs: Path, name: str, calib: tuple[int, int]) -> Path:
    """The bench config (YAML) for one model."""
    import yaml

    raw = {
        "base": {"path": str(base)},
        "adapter": {"path": str(adapter)},
        "output": {"dir": str(runs), "run_name": name},
        "runtime": {"device": "cpu", "offload": "on"},
        "dequantize": {
            "quant_type": "nf4",
            "double_quant": True,
            "compute_dtype": "bfloat16",
            "dtype": "bfloat16",
            "save": False,
        },
        "merge": {"base": "dequantized", "compare_bases": False},
        "verify": {
            "seq_len": 512,
            "data": {"name": "pydoc-heldout", "source": "embedded", "split": "heldout", "max_tokens": 1024},
        },
        "requantize": {
            "bits": 4,
            "group_size": 128,
            "desc_act": True,
            "sym": True,
            "num_samples": calib[0],
            "seq_len": calib[1],
            "calibration": {"name": "pydoc-train", "source": "embedded", "split": "train"},
        },
    }
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- running the stages ----------------------------------------------------------------------------


def _children_usage() -> dict:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"read": ru.ru_inblock * 512, "written": ru.ru_oublock * 512, "cpu": ru.ru_utime + ru.ru_stime}


def run_stage(cfg, stage: str, inputs: list[Path]) -> dict:
    """One stage in its own process (``run_all(cfg, [stage])``), inputs dropped from the page cache
    first; its record's seconds and peak RSS, and the process's storage bytes read and written."""
    from pipeline.run import run_all

    for p in inputs:
        if p.is_dir():
            _flush_and_drop(p)
    before = _children_usage()
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rc = run_all(cfg, [stage])
    wall = time.perf_counter() - t0
    after = _children_usage()
    t0 = time.perf_counter()
    for p in cfg.layout.root.iterdir():  # what the stage wrote, flushed (timed apart)
        if p.is_dir() and p.name != "stages":
            _flush_and_drop(p)
    flush = time.perf_counter() - t0
    rec = json.loads(cfg.layout.record(stage).read_text()) if cfg.layout.record(stage).is_file() else {}
    out = {
        "rc": rc,
        "status": rec.get("status"),
        "seconds": rec.get("seconds"),
        "wall_seconds": round(wall, 1),
        "flush_seconds": round(flush, 1),
        "peak_rss_bytes": rec.get("peak_rss_bytes"),
        "read_bytes": after["read"] - before["read"],
        "written_bytes": after["written"] - before["written"],
        "cpu_seconds": round(after["cpu"] - before["cpu"], 1),
        "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    for k in ("passed", "kl_divergence", "top1_agreement", "tokens", "layerwise", "calibration_tokens", "size_bytes"):
        if k in rec:
            out[k] = rec[k]
    if "error" in rec:
        out["error"] = rec["error"]
    return out


def _gptq_memory_short(shape: dict) -> str | None:
    """Why GPTQ would not fit in the memory available now (None when it fits). GPTQModel's save
    materializes the embeddings and the head in float32 and copies each once more while writing
    (measured: 8.4 GB for two Llama-3-8B layers); estimate 1.5 x 2 x 4 bytes x their elements + 1.5 GB."""
    import psutil

    need = 1.5 * 2 * 4 * shape["vocab"] * shape["hidden"] + 1.5 * GB
    avail = psutil.virtual_memory().available
    if need > avail - 1.0 * GB:
        return f"needs about {need / GB:.1f} GB of memory, {avail / GB:.1f} GB are available (shared machine)"
    return None


def run_model(
    work: Path, name: str, shape: dict, layers: int, stages: list[str], calib, keep: bool, limits_probe: bool = False
) -> dict:
    """Build model ``name``, run ``stages`` on it, remove it (unless ``keep``). With ``limits_probe``,
    the NF4 quantize throughput is measured again just before merge and verify (the machine's load
    changes; each stage is compared with the throughput of its own moment)."""
    from pipeline.common import log
    from pipeline.config import load_config

    folder = work / name
    base, adapter, runs = folder / "base", folder / "adapter", folder / "runs"
    shutil.rmtree(folder, ignore_errors=True)
    log(f"bench-scale: writing the synthetic {name} checkpoint ({layers} layers) to {base}")
    t0 = time.perf_counter()
    facts = write_base(base, shape, layers)
    facts["adapter"] = write_adapter(adapter, shape, layers)
    facts["write_seconds"] = round(time.perf_counter() - t0, 1)
    facts.update(layers=layers, shape=shape)
    cfg = load_config(write_config(folder / "config.yaml", base, adapter, runs, name, calib))
    result = {"model": facts, "stages": {}}
    try:
        for stage in stages:
            log(f"bench-scale: {name}: stage {stage}")
            inputs = [base, adapter] + ([cfg.layout.root] if stage != "dequantize" else [])
            if stage == "requantize" and (short := _gptq_memory_short(shape)):
                log(f"bench-scale: {name}: requantize skipped: {short}")
                result["stages"][stage] = {"status": "skipped", "error": short}
                continue
            probe = nf4_speed(repeats=2) if limits_probe and stage in ("merge", "verify") else {}
            r = run_stage(cfg, stage, inputs)
            if probe:
                r["nf4_quantize_per_s"] = probe["nf4_quantize_per_s"]
            result["stages"][stage] = r
            log(
                f"bench-scale: {name}: {stage} {r['seconds']} s, peak RSS {(r['peak_rss_bytes'] or 0) / 2**30:.2f} GiB, "
                f"read {r['read_bytes'] / GB:.2f} GB, written {r['written_bytes'] / GB:.2f} GB"
            )
            if r["rc"] != 0:
                break
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result


_PROBE = r"""
import json, sys
from pathlib import Path
from transformers import AutoConfig
from pipeline.lora import attach_adapter, build_skeleton
from pipeline.common import peak_rss_bytes
base_rss = peak_rss_bytes()
pm = attach_adapter(build_skeleton(AutoConfig.from_pretrained(sys.argv[1])), sys.argv[2])
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(), "libraries_rss_bytes": base_rss}))
"""


def adapter_probe(work: Path, shape: dict, layer_counts=(4, 80)) -> dict:
    """Peak RSS of a process that builds the meta skeleton and attaches the adapter (what grows
    with the layer count in merge and verify), for each of ``layer_counts`` layers."""
    out = {}
    for n in layer_counts:
        folder = work / f"probe-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.mkdir(parents=True)
            llama_config(shape, n).save_pretrained(folder)
            write_adapter(folder / "adapter", shape, n)
            res = subprocess.run(
                [sys.executable, "-c", _PROBE, str(folder), str(folder / "adapter")],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-2000:])
            out[n] = json.loads(res.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return out


# --- figures, ratios, projection -------------------------------------------------------------------


def stage_flops(facts: dict, stage: str, tokens: int) -> float:
    """Float32 FLOPs the stage cannot avoid (a lower bound, not a model of the stage): verify runs
    the merged model and the reference forward on ``tokens``; GPTQ runs each layer forward twice
    on the calibration tokens and accumulates one Hessian (2 x tokens x in^2) per linear."""
    shape, layers = facts["shape"], facts["layers"]
    h, i = shape["hidden"], shape["intermediate"]
    params = facts["params"] - shape["vocab"] * h  # the embedding is a lookup
    if stage == "verify":
        return 2 * 2 * params * tokens
    if stage == "requantize":
        hess = layers * tokens * 2 * (6 * h * h + i * i)  # q, k, v, o, gate, up read h; down reads i
        return 2 * 2 * facts["quantized"] * tokens + hess
    return 0.0


def figures(name: str, run: dict, limits: dict) -> dict:
    """Per stage: seconds, peak RSS, bytes, GB/s, and each as a ratio to its limit."""
    facts = run["model"]
    out = {}
    for stage, r in run["stages"].items():
        if r.get("status") == "skipped":
            out[stage] = {
                **r,
                "read_bytes": 0,
                "written_bytes": 0,
                "read_gbps": None,
                "write_gbps": None,
                "read_ratio": None,
                "write_ratio": None,
            }
            continue
        sec = r.get("seconds") or 0.0
        row = dict(r)
        row["read_gbps"] = r["read_bytes"] / GB / sec if sec else None
        row["write_gbps"] = r["written_bytes"] / GB / sec if sec else None
        row["read_ratio"] = row["read_gbps"] * GB / limits["disk_read_bps"] if sec else None
        row["write_ratio"] = row["write_gbps"] * GB / limits["disk_write_bps"] if sec else None
        io_bound = r["read_bytes"] / limits["disk_read_bps"] + r["written_bytes"] / limits["disk_write_bps"]
        nf4 = r.get("nf4_quantize_per_s") or limits["nf4_quantize_per_s"]
        quantize_bound = facts["quantized"] / nf4 if stage in ("merge", "verify") else 0.0
        tokens = r.get("tokens") or 0
        if stage == "requantize":
            tokens = r.get("calibration_tokens") or 0
        compute_bound = stage_flops(facts, stage, tokens) / limits["fp32_matmul_flops"]
        bound = max(io_bound, quantize_bound + compute_bound) if stage != "dequantize" else 0.0  # save: false
        row.update(
            io_bound_seconds=io_bound,
            nf4_bound_seconds=quantize_bound,
            compute_bound_seconds=compute_bound,
            bound_seconds=bound,
            time_ratio=sec / bound if bound else None,
            nf4_ratio=sec / quantize_bound if quantize_bound else None,
        )
        per_cpu_s = limits.get("nf4_quantize_per_cpu_s")
        if stage in ("merge", "verify") and per_cpu_s and r.get("cpu_seconds"):
            # the same ratio in CPU time: the stage's CPU seconds over quantize_4bit's CPU seconds for
            # the same elements (what an otherwise idle machine would show as wall time)
            row["nf4_cpu_ratio"] = r["cpu_seconds"] / (facts["quantized"] / per_cpu_s)
        out[stage] = row
    return out


def per_layer(small: dict, large: dict) -> dict:
    """Per-layer and fixed parts of each stage's seconds and bytes, from two runs of one shape that
    differ only in their layer count: x = fixed + layers x per_layer."""
    ls, ll = small["model"]["layers"], large["model"]["layers"]
    out = {}
    for stage in large["stages"]:
        if stage not in small["stages"]:
            continue
        a, b = small["stages"][stage], large["stages"][stage]
        row = {}
        for k in ("seconds", "read_bytes", "written_bytes", "cpu_seconds"):
            if a.get(k) is None or b.get(k) is None:
                continue
            slope = (b[k] - a[k]) / (ll - ls)
            row[k] = {"per_layer": slope, "fixed": b[k] - ll * slope}
        row["peak_rss_bytes"] = {"small": a.get("peak_rss_bytes"), "large": b.get("peak_rss_bytes")}
        out[stage] = row
    return out


def project(layers_fit: dict, large: dict, probe: dict | None, layers: int) -> dict:
    """A stage on the full model: seconds and bytes from the per-layer fit; peak RSS as the
    measured peak plus what the skeleton with the adapter grows by from the measured layer count
    to ``layers`` (``adapter_probe``)."""
    grow = 0
    n_large = large["model"]["layers"]
    if probe and n_large in probe and layers in probe:
        grow = max(0, probe[layers]["peak_rss_bytes"] - probe[n_large]["peak_rss_bytes"])
    out = {}
    for stage, fit in layers_fit.items():
        row = {
            k: fit[k]["fixed"] + layers * fit[k]["per_layer"]
            for k in ("seconds", "read_bytes", "written_bytes", "cpu_seconds")
            if k in fit
        }
        peak = large["stages"][stage].get("peak_rss_bytes") or 0
        row["peak_rss_bytes"] = peak + grow
        row["adapter_growth_bytes"] = grow
        out[stage] = row
    return out


def check_targets(doc: dict) -> list[dict]:
    """The targets of issue 10, each with the measured value and whether it is met."""
    t, rows = TARGETS, []
    m = doc["models"]

    def row(what, value, limit, unit):
        rows.append(
            {"target": what, "value": value, "limit": limit, "unit": unit, "met": value is not None and value <= limit}
        )

    if "8b" in m:
        s = m["8b"]["figures"]
        dm = [s[k] for k in ("dequantize", "merge") if k in s]
        if dm:
            row(
                "8B dequantize + merge peak RSS",
                max(x["peak_rss_bytes"] or 0 for x in dm) / GB,
                t["8b_dequantize_merge_rss"] / GB,
                "GB",
            )
            secs = sum(x["seconds"] or 0 for x in dm)
            bound = s["merge"]["nf4_bound_seconds"] if "merge" in s else None
            row(
                "8B dequantize + merge time / NF4-quantize bound",
                secs / bound if bound else None,
                t["8b_dequantize_merge_time_ratio"],
                "x",
            )
            cpu = sum(x.get("cpu_seconds") or 0 for x in dm)
            per_cpu_s = doc["limits"].get("nf4_quantize_per_cpu_s")
            if per_cpu_s and "merge" in s:
                row(
                    "the same in CPU time (independent of other work on the machine)",
                    cpu / (m["8b"]["model"]["quantized"] / per_cpu_s),
                    t["8b_dequantize_merge_time_ratio"],
                    "x",
                )
        if "verify" in s:
            row(
                "8B verify (1024 tokens) peak RSS",
                (s["verify"]["peak_rss_bytes"] or 0) / GB,
                t["8b_verify_rss"] / GB,
                "GB",
            )
    if "70b-4l" in m:
        s = m["70b-4l"]["figures"]
        peak = max((x["peak_rss_bytes"] or 0) for k, x in s.items() if k in STAGES_FULL)
        row("70B shape (4 layers) peak RSS, dequantize/merge/verify", peak / GB, t["70b_layer_rss"] / GB, "GB")
    p = doc.get("projection_70b") or {}
    if "merge" in p:
        row("full 70B merge, projected time", p["merge"]["seconds"], t["70b_merge_seconds"], "s")
        row("full 70B merge, projected peak RSS", p["merge"]["peak_rss_bytes"] / GB, t["70b_merge_rss"] / GB, "GB")
    if "verify" in p:
        row(
            "full 70B verify, projected peak RSS (6 GB per-layer target)",
            p["verify"]["peak_rss_bytes"] / GB,
            t["70b_layer_rss"] / GB,
            "GB",
        )
    return rows


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def markdown(doc: dict) -> str:
    lim = doc["limits"]
    lines = [
        "# Scale benchmark",
        "",
        f"{doc['machine']['cpu_count']} cores, {doc['machine']['ram_bytes'] / 2**30:.0f} GiB RAM, torch threads "
        f"{lim['torch_threads']}; load average at start {doc['machine']['loadavg_start']}, at end "
        f"{doc['machine'].get('loadavg_end')} (other work on the machine slows every figure alike).",
        "",
        "Limits of this machine (measured in this run):",
        "",
        f"- disk write {lim['disk_write_bps'] / GB:.2f} GB/s, read {lim['disk_read_bps'] / GB:.2f} GB/s "
        f"(O_DIRECT, {lim['probe_bytes'] / GB:.1f} GB)",
        f"- bitsandbytes NF4 (double quant, bf16) on 4096 x 14336: quantize_4bit "
        f"{lim['nf4_quantize_per_s'] / 1e6:.1f} M elements/s, dequantize_4bit {lim['nf4_dequantize_per_s'] / 1e6:.0f} "
        f"M elements/s",
        f"- float32 matmul {lim['fp32_matmul_flops'] / 1e9:.0f} GFLOP/s",
        "",
        f"Config: dequantize.save {doc['config']['dequantize_save']} (the merge streams the NF4 reconstruction "
        f"itself), compute dtype bfloat16, output bfloat16, merge.compare_bases false, runtime.offload on, "
        f"verify on {doc['config']['verify_tokens']} tokens (seq_len 512), GPTQ 4-bit g128 act-order with "
        f"{doc['config']['calibration'][0]} x {doc['config']['calibration'][1]} calibration tokens.",
        "",
        "Per stage: the stage's own seconds (its record) and peak RSS (VmHWM of the stage process), the storage bytes its "
        "process read and wrote (inputs dropped from the page cache first), GB/s as a ratio to the disk, "
        "and the time as a ratio to its bound: merge `NF4 bound` = quantized elements / quantize_4bit "
        "throughput; `bound` = max(I/O at disk speed, NF4 quantize + float32 FLOPs at matmul speed).",
        "",
        "| model | stage | seconds | CPU s | peak RSS GB | read GB | written GB | read GB/s (x disk) "
        "| write GB/s (x disk) | x NF4 bound | x NF4 bound, CPU time | x bound | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in doc["models"].items():
        for stage, r in m["figures"].items():
            note = []
            if stage == "dequantize":
                note.append("checks + plan only (save false)")
            if r.get("passed") is not None:
                note.append(f"passed {r['passed']}, KL {r.get('kl_divergence', 0):.2g}")
            if r.get("size_bytes"):
                note.append(f"GPTQ {r['size_bytes'] / GB:.2f} GB")
            if r.get("status") != "ok":
                note.append(f"status {r.get('status')}: {r.get('error', '')[:80]}")
            lines.append(
                f"| {name} | {stage} | {_f(r.get('seconds'))} | {_f(r.get('cpu_seconds'))} "
                f"| {_f((r.get('peak_rss_bytes') or 0) / GB, '{:.2f}')} | {r['read_bytes'] / GB:.2f} "
                f"| {r['written_bytes'] / GB:.2f} | {_f(r['read_gbps'], '{:.2f}')} ({_f(r['read_ratio'], '{:.2f}')}) "
                f"| {_f(r['write_gbps'], '{:.2f}')} ({_f(r['write_ratio'], '{:.2f}')}) "
                f"| {_f(r.get('nf4_ratio'), '{:.2f}')} | {_f(r.get('nf4_cpu_ratio'), '{:.2f}')} "
                f"| {_f(r.get('time_ratio'), '{:.2f}')} | {'; '.join(note)} |"
            )
    for shape, fit in doc.get("per_layer", {}).items():
        lines += [
            "",
            f"Per decoder layer of the {shape} shape (difference of the two layer counts):",
            "",
            "| stage | seconds per layer | fixed seconds | read GB per layer | written GB per layer |",
            "|---|---|---|---|---|",
        ]
        for stage, f in fit.items():
            lines.append(
                f"| {stage} | {_f(f.get('seconds', {}).get('per_layer'))} | {_f(f.get('seconds', {}).get('fixed'))} "
                f"| {_f(f.get('read_bytes', {}).get('per_layer', 0) / GB, '{:.2f}')} "
                f"| {_f(f.get('written_bytes', {}).get('per_layer', 0) / GB, '{:.2f}')} |"
            )
    p = doc.get("projection_70b")
    if p:
        lines += [
            "",
            "Full Llama-3-70B (80 layers), projected from the per-layer figures; peak RSS = the 4-layer "
            "run's peak + what the skeleton with the adapter grows by from 4 to 80 layers "
            f"({(doc.get('adapter_probe_growth') or 0) / GB:.2f} GB, measured):",
            "",
            "| stage | seconds | hours | CPU s | peak RSS GB | read GB | written GB |",
            "|---|---|---|---|---|---|---|",
        ]
        for stage, r in p.items():
            lines.append(
                f"| {stage} | {_f(r.get('seconds'), '{:.0f}')} | {_f((r.get('seconds') or 0) / 3600, '{:.2f}')} "
                f"| {_f(r.get('cpu_seconds'), '{:.0f}')} "
                f"| {r['peak_rss_bytes'] / GB:.2f} | {_f(r.get('read_bytes', 0) / GB)} "
                f"| {_f(r.get('written_bytes', 0) / GB)} |"
            )
    lines += ["", "Targets (issue 10):", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in doc["targets"]:
        lines.append(
            f"| {t['target']} | {_f(t['value'], '{:.2f}')} {t['unit']} | {t['limit']:g} {t['unit']} "
            f"| {'yes' if t['met'] else 'no'} |"
        )
    lines += ["", f"Total {doc['total_seconds'] / 60:.0f} min. Command: `{doc['command']}`.", ""]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def plan_models(a) -> list[tuple[str, str, int, list[str]]]:
    """(name, shape, layers, stages) of the models this run builds, in order."""
    full = [("8b", "8b", FULL_LAYERS["8b"] if not a.small else 4)] if not a.skip_8b else []
    full += [("70b-4l", "70b", 4)] if not a.skip_70b else []
    sliced = [("8b-2l", "8b", 2)] if not a.skip_8b else []
    sliced += [("70b-2l", "70b", 2)] if not a.skip_70b else []
    # the models of the targets first; the 2-layer slices (per-layer figures, GPTQ) after them
    return [(*m, STAGES_FULL) for m in full] + [(*m, STAGES_FULL if a.skip_gptq else STAGES_GPTQ) for m in sliced]


def model_bytes(shape: dict, layers: int) -> int:
    return 2 * sum(math.prod(s) for _, s in base_shapes(shape, layers))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-scale", help="where bench.md and bench.json go")
    ap.add_argument("--work", help="where the synthetic checkpoints go (default: <out>/work)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and run folders")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-70b", action="store_true")
    ap.add_argument("--skip-gptq", action="store_true", help="no GPTQ on the 2-layer slices")
    ap.add_argument(
        "--calib",
        type=int,
        nargs=2,
        default=(16, 512),
        metavar=("SAMPLES", "SEQ_LEN"),
        help="GPTQ calibration windows x tokens (default 16 x 512: what a 2-core CPU does in minutes)",
    )
    ap.add_argument("--disk-probe-gb", type=float, default=2.0)
    ap.add_argument("--small", action="store_true", help="small shapes (hidden 512/1024, vocab 32000): seconds")
    ap.add_argument("--render", action="store_true", help="only write bench.md again from <out>/bench.json")
    a = ap.parse_args(argv)
    if a.render:
        return render(Path(a.out).resolve())

    from pipeline.common import log, quiet_libraries
    from pipeline.layout import versions

    quiet_libraries()
    t_start = time.perf_counter()
    out = Path(a.out).resolve()
    work = Path(a.work).resolve() if a.work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    shapes = SMALL_SHAPES if a.small else SHAPES
    models = plan_models(a)

    # free disk first: the largest model x 3 (base, merged, one more)
    need = max((3 * model_bytes(shapes[s], n) for _, s, n, _ in models), default=0)
    free = shutil.disk_usage(out).free
    log(f"bench-scale: {len(models)} models; the largest needs {need / GB:.1f} GB of disk, {free / GB:.1f} GB free")
    if free < need + a.disk_probe_gb * GB:
        print(
            f"error: bench-scale needs about {need / GB:.1f} GB free in {out} (3x the largest model), "
            f"{free / GB:.1f} GB are free. Free space, pass --work on a larger disk, or --skip-70b.",
            file=sys.stderr,
        )
        return 2

    import psutil

    doc: dict = {
        "command": "python -m pipeline.bench_scale " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpu_count": os.cpu_count(),
            "ram_bytes": psutil.virtual_memory().total,
            "platform": platform.platform(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": versions(),
        "config": {"dequantize_save": False, "verify_tokens": 1024, "calibration": list(a.calib), "small": a.small},
        "models": {},
    }
    log("bench-scale: measuring the disk and bitsandbytes NF4 throughput")
    doc["limits"] = {**disk_speed(work, int(a.disk_probe_gb * GB)), **nf4_speed()}
    for name, shape, layers, stages in models:
        run = run_model(work, name, shapes[shape], layers, stages, tuple(a.calib), a.keep, limits_probe=True)
        doc["models"][name] = run
        run["figures"] = figures(name, run, doc["limits"])
        _write(out, doc)
    if "70b-4l" in doc["models"] and "70b-2l" in doc["models"]:
        log("bench-scale: memory of the skeleton with the adapter attached, 4 and 80 layers of the 70B shape")
        probe = adapter_probe(work, shapes["70b"], (4, FULL_LAYERS["70b"]))
        doc["adapter_probe"] = {str(k): v for k, v in probe.items()}
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["total_seconds"] = time.perf_counter() - t_start
    derive(doc)
    _write(out, doc)
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(markdown(doc))
    return 0


def derive(doc: dict) -> dict:
    """Figures with their ratios, per-layer fits, the 70B projection and the targets, from the
    measured runs and limits in ``doc`` (done again by ``--render``)."""
    m = doc["models"]
    for name, run in m.items():
        run["figures"] = figures(name, run, doc["limits"])
    doc["per_layer"] = {}
    if "8b" in m and "8b-2l" in m:
        doc["per_layer"]["8b"] = per_layer(m["8b-2l"], m["8b"])
    if "70b-4l" in m and "70b-2l" in m:
        doc["per_layer"]["70b"] = per_layer(m["70b-2l"], m["70b-4l"])
        probe = {int(k): v for k, v in (doc.get("adapter_probe") or {}).items()}
        if probe:
            doc["adapter_probe_growth"] = probe[FULL_LAYERS["70b"]]["peak_rss_bytes"] - probe[4]["peak_rss_bytes"]
        doc["projection_70b"] = project(doc["per_layer"]["70b"], m["70b-4l"], probe, FULL_LAYERS["70b"])
    doc["targets"] = check_targets(doc)
    return doc


def render(out: Path) -> int:
    """``--render``: bench.md again from ``<out>/bench.json`` (after a change to the report); a limit
    the run did not measure (the quantize throughput per CPU-second) is measured now and marked so."""
    doc = json.loads((out / "bench.json").read_text())
    if "nf4_quantize_per_cpu_s" not in doc["limits"]:
        doc["limits"]["nf4_quantize_per_cpu_s"] = nf4_speed(repeats=3)["nf4_quantize_per_cpu_s"]
        doc["limits_measured_at_render"] = ["nf4_quantize_per_cpu_s"]
    derive(doc)
    _write(out, doc)
    print(markdown(doc))
    return 0


def _write(out: Path, doc: dict) -> None:
    (out / "bench.json").write_text(json.dumps(doc, indent=2, default=str))
    if "targets" in doc:
        (out / "bench.md").write_text(markdown(doc))


if __name__ == "__main__":
    sys.exit(main())
