"""A plan before the work: per stage, estimated peak RAM, peak GPU memory, disk written and a
time range, from the base checkpoint's headers and the config (no weights are read).

The estimates follow how each stage holds data (see the stage modules) and this project's
measured throughputs (README, "Scale"); times are ranges because machines differ. The run
prints the plan first and writes it to ``plan.json``; the start-of-run check refuses a run
whose free disk is smaller than what it will write.
"""

from __future__ import annotations

from pipeline import gptq

# Throughputs measured on the 2-core reference machine (README "Scale"), elements or FLOP per second.
NF4_QUANTIZE_PER_S = 32e6  # bitsandbytes quantize_4bit on 2 CPU threads
CPU_FLOPS = 40e9  # fp32 matmul, 2 cores
GPU_FLOPS = 200e12
DISK_WRITE_BPS = 1.0e9
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_facts(base) -> dict:
    """Parameter counts of a :class:`pipeline.checkpoint.Checkpoint`: ``params``, ``quantized``
    (2-D weights inside decoder layers: what bitsandbytes and GPTQ quantize), ``largest``
    (elements of the largest tensor), ``layers``, ``vocab``."""
    shapes = base.shapes()
    numel = {k: _prod(s) for k, s in shapes.items()}
    quantized = sum(n for k, n in numel.items() if k in gptq.linear_in_features(shapes))
    c = base.config.get("text_config") or base.config
    return {
        "params": sum(numel.values()),
        "quantized": quantized,
        "largest": max(numel.values(), default=0),
        "layers": int(c.get("num_hidden_layers") or c.get("n_layer") or 1),
        "hidden": int(c.get("hidden_size") or c.get("n_embd") or 0),
        "vocab": int(c.get("vocab_size") or 0),
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def plan(cfg, stages: list[str], base) -> dict:
    """The plan of a run of ``stages`` on ``base``.

    Returns:
        ``{"model": model_facts, "stages": {stage: {"ram_bytes", "gpu_bytes", "disk_bytes",
        "seconds_low", "seconds_high"}}, "disk_peak_bytes"}``. ``disk_peak_bytes``: what the
        run leaves on disk plus the largest temporary store, in bytes.
    """
    from pipeline.models import pick_device

    f = model_facts(base)
    gpu = pick_device(cfg.runtime) == "cuda"
    b_out = _BYTES[cfg.out_dtype]
    n, nq, rest = f["params"], f["quantized"], f["params"] - f["quantized"]
    candidates = 2 if cfg.merge.compare_bases and not base.is_bnb_4bit else 1
    layer = nq / max(1, f["layers"])
    flops = CPU_FLOPS if not gpu else GPU_FLOPS
    out: dict = {}

    def add(name, ram, disk, seconds, gpu_bytes=0, scratch=0):
        out[name] = {
            "ram_bytes": int(ram),
            "gpu_bytes": int(gpu_bytes if gpu else 0),
            "disk_bytes": int(disk),
            "scratch_bytes": int(scratch),
            "seconds_low": round(seconds / 2, 1),
            "seconds_high": round(seconds * 2, 1),
        }

    stream_ram = 6 * f["largest"] * 4 + 2**30  # a few of the largest tensors in float32 + the adapter and libraries
    quantize_s = nq / NF4_QUANTIZE_PER_S if not gpu else nq / 5e9
    if "dequantize" in stages:
        add(
            "dequantize",
            stream_ram,
            n * b_out if cfg.dequantize.save else 0,
            quantize_s + n * b_out / DISK_WRITE_BPS,
            gpu_bytes=6 * f["largest"] * 4,
        )
    if "merge" in stages:
        add(
            "merge",
            stream_ram,
            candidates * n * b_out,
            candidates * (quantize_s + n * b_out / DISK_WRITE_BPS),
            gpu_bytes=6 * f["largest"] * 4,
        )
    v = cfg.verify
    vtok = v.seq_len * max(1, -(-(v.data.max_tokens or max(1024, 2 * v.seq_len)) // v.seq_len))
    store = lambda tokens: tokens * f["vocab"] * 4  # noqa: E731  float32 log-probs per token
    forward = lambda tokens: 2 * n * tokens / flops  # noqa: E731
    model_ram = nq * 0.5 + rest * 4 + n * 4  # the 4-bit reference, then one variant in float32
    if "verify" in stages:
        add(
            "verify",
            model_ram + 2**30,
            0,
            (1 + 2 * candidates) * forward(vtok),
            gpu_bytes=n * b_out,
            scratch=2 * store(vtok),
        )
    rq = cfg.requantize
    if "requantize" in stages and rq.enabled:
        settings = (
            [rq]
            + [gptq.resolve(rq, a) for a in rq.alternatives]
            + [gptq.resolve(rq, s) for s in (rq.budget.settings if rq.budget else [])]
        )
        disk = sum(nq * gptq.bits_per_weight(s) / 8 + rest * 2 for s in settings[: 1 + len(rq.alternatives)]) + (
            max((nq * gptq.bits_per_weight(s) / 8 + rest * 2 for s in settings[1 + len(rq.alternatives) :]), default=0)
        )
        calib = rq.num_samples * rq.seq_len
        gptq_s = len(settings) * (3 * forward(calib) + f["layers"] * 7 * (layer / 7) ** 1.5 / flops * 50)
        add(
            "requantize",
            n * 4 + 4 * calib * f["hidden"] * 4 + 2**30,
            disk,
            gptq_s,
            gpu_bytes=n * 2,
            scratch=store(vtok) if rq.budget else 0,
        )
    e = cfg.eval
    if "evaluate" in stages:
        etok = sum(e.seq_len * max(1, (d.max_tokens or max(4096, 8 * e.seq_len)) // e.seq_len) for d in e.datasets)
        n_variants = len(e.variants) + len(e.baselines) + len(rq.alternatives) + 1
        add(
            "evaluate",
            model_ram + 2**30,
            3 * 2**20,
            n_variants * forward(etok) * (3 if e.tasks else 1),
            gpu_bytes=n * b_out,
            scratch=store(etok),
        )
    persistent = sum(s["disk_bytes"] for s in out.values())
    return {
        "model": f,
        "device": "cuda" if gpu else "cpu",
        "stages": out,
        "disk_peak_bytes": int(persistent + max((s["scratch_bytes"] for s in out.values()), default=0)),
    }


def table(p: dict) -> str:
    """The plan as a Markdown table (GB = 1e9 bytes)."""
    lines = [
        f"Plan for {p['model']['params'] / 1e9:.2f} B parameters on {p['device']} "
        f"(estimates; disk needed at the peak: {p['disk_peak_bytes'] / 1e9:.2f} GB)",
        "",
        "| stage | peak RAM (GB) | peak GPU (GB) | disk written (GB) | temporary (GB) | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in p["stages"].items():
        lines.append(
            f"| {name} | {s['ram_bytes'] / 1e9:.2f} | {s['gpu_bytes'] / 1e9:.2f} | {s['disk_bytes'] / 1e9:.2f} "
            f"| {s['scratch_bytes'] / 1e9:.2f} | {s['seconds_low']:g}-{s['seconds_high']:g} |"
        )
    return "\n".join(lines)
