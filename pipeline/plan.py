"""A plan before the work: per stage, estimated peak RAM, peak GPU memory, disk written and a
time range, from the base checkpoint's headers and the config (no weights are read).

The estimates follow how each stage holds data (see the stage modules) and this project's
measured throughputs (README, "Scale benchmark": ``make bench-scale``); times are ranges
because machines differ. The run
prints the plan first and writes it to ``plan.json``; the start-of-run check refuses a run
whose free disk is smaller than what it will write.
"""

from __future__ import annotations

from pipeline import gptq

# Measured on the 2-core reference machine by `make bench-scale` (README "Scale benchmark"): synthetic
# Llama-3.1-8B / Llama-3-70B-shaped checkpoints, bf16, one process per stage.
NF4_QUANTIZE_PER_S = 45e6  # bitsandbytes quantize_4bit (bf16, double quant) on 2 CPU threads, elements/s
MERGE_OVER_NF4 = 1.6  # a streamed merge takes this many times its NF4-quantize time (reads, B @ A, casts, writes)
VERIFY_OVER_BOUND = 1.6  # layer-wise verify: times (reference's NF4 quantize + float32 matmul FLOPs + reads)
GPTQ_SOLVE_FLOP_FACTOR = 4.0  # GPTQModel's solve on CPU: FLOPs per (in^2 x out) of each quantized linear
CPU_FLOPS = 80e9  # float32 matmul, 2 cores
GPU_FLOPS = 200e12
DISK_WRITE_BPS = 1.0e9
DISK_READ_BPS = 0.8e9
LIBRARIES_RAM = 0.6e9  # a stage process with torch, transformers, peft and bitsandbytes imported
QUANTIZE_TEMP_BYTES = 18  # bytes per element quantize_4bit holds at once (its float32 temporaries)
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def model_facts(base, adapter_params: int = 0) -> dict:
    """Parameter counts of a :class:`pipeline.checkpoint.Checkpoint`: ``params``, ``quantized``
    (2-D weights inside decoder layers: what bitsandbytes and GPTQ quantize), ``largest``
    (elements of the largest tensor), ``largest_quantized``, ``largest_other`` (the largest tensor
    kept as stored: embeddings, ``lm_head``), ``head`` (elements of the output embedding), ``solve``
    (sum of in^2 x out over the quantized weights: GPTQ's work), ``layers``, ``hidden``, ``vocab``,
    ``adapter`` (adapter parameters, when known)."""
    shapes = base.shapes()
    numel = {k: _prod(s) for k, s in shapes.items()}
    widths = gptq.linear_in_features(shapes)
    quantized = sum(n for k, n in numel.items() if k in widths)
    c = base.config.get("text_config") or base.config
    hidden = int(c.get("hidden_size") or c.get("n_embd") or 0)
    vocab = int(c.get("vocab_size") or 0)
    return {
        "params": sum(numel.values()),
        "quantized": quantized,
        "largest": max(numel.values(), default=0),
        "largest_quantized": max((n for k, n in numel.items() if k in widths), default=0),
        "largest_other": max((n for k, n in numel.items() if k not in widths), default=0),
        "head": vocab * hidden,
        "solve": sum(widths[k] * n for k, n in numel.items() if k in widths),
        "layers": int(c.get("num_hidden_layers") or c.get("n_layer") or 1),
        "hidden": hidden,
        "vocab": vocab,
        "adapter": int(adapter_params),
    }


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _adapter_params(cfg) -> int:
    """Parameters of the adapter (0 when it is not a local folder yet: a hub id, or combined at merge time)."""
    from pipeline.checkpoint import AdapterFiles
    from pipeline.errors import InputError

    try:
        return sum(_prod(s) for s in AdapterFiles(cfg.adapter.paths[0], cfg.adapter.allow_pickle).shapes.values())
    except (InputError, OSError):
        return 0


def plan(cfg, stages: list[str], base) -> dict:
    """The plan of a run of ``stages`` on ``base``.

    Streamed stages (dequantize, merge, and verify/requantize one decoder layer at a time under
    ``runtime.offload``) hold the libraries, the adapter in float32 and the largest single piece
    of work: bitsandbytes' float32 temporaries while it quantizes the largest linear weight, the
    largest kept tensor in the output dtype, or, when scoring, the float32 head (or one decoder
    layer) and a few windows of float32 log-probabilities. Times scale the unavoidable work (NF4
    quantization, matmul FLOPs, reads) by factors measured on the reference machine.

    Returns:
        ``{"model": model_facts, "stages": {stage: {"ram_bytes", "gpu_bytes", "disk_bytes",
        "seconds_low", "seconds_high"}}, "disk_peak_bytes"}``. ``disk_peak_bytes``: what the
        run leaves on disk plus the largest temporary folder (GPTQModel's disk offload), in bytes.
    """
    from pipeline.models import layerwise_wanted, pick_device

    f = model_facts(base, _adapter_params(cfg))
    gpu = pick_device(cfg.runtime) == "cuda"
    b_out = _BYTES[cfg.out_dtype]
    n, nq, rest = f["params"], f["quantized"], f["params"] - f["quantized"]
    b_in = max(1, round(sum(t.nbytes for t in base.tensors.values()) / max(1, n)))
    candidates = 2 if cfg.merge.compare_bases and not base.is_bnb_4bit else 1
    layer = nq / max(1, f["layers"])
    flops = CPU_FLOPS if not gpu else GPU_FLOPS
    layerwise = layerwise_wanted(cfg, n)
    adapter_ram = 4 * f["adapter"]
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

    quantize_ram = QUANTIZE_TEMP_BYTES * f["largest_quantized"]
    quantize_s = nq / NF4_QUANTIZE_PER_S if not gpu else nq / 5e9
    startup_s = 10.0
    if "dequantize" in stages:
        save = cfg.dequantize.save
        add(
            "dequantize",
            LIBRARIES_RAM + (max(quantize_ram, 1.2 * b_out * f["largest_other"]) if save else 0),
            n * b_out if save else 0,
            startup_s + (MERGE_OVER_NF4 * quantize_s if save else 0),
            gpu_bytes=6 * f["largest"] * 4,
        )
    if "merge" in stages:
        add(
            "merge",
            LIBRARIES_RAM + adapter_ram + max(quantize_ram, 1.2 * b_out * f["largest_other"]),
            candidates * n * b_out,
            startup_s + candidates * MERGE_OVER_NF4 * quantize_s,
            gpu_bytes=6 * f["largest"] * 4,
        )
    v = cfg.verify
    windows = max(1, -(-(v.data.max_tokens or max(1024, 2 * v.seq_len)) // v.seq_len))
    vtok = v.seq_len * windows
    store = lambda tokens: tokens * f["vocab"] * 4  # noqa: E731  float32 log-probs per token
    forward = lambda tokens: 2 * n * tokens / flops  # noqa: E731
    model_ram = nq * 0.5 + rest * 4 + n * 4  # the 4-bit reference, then one variant in float32
    # one decoder layer at a time: the float32 head (or a float32 layer) and three windows of log-probs
    layer_ram = max(4 * f["head"] + 3 * store(v.seq_len), 1.3 * 4 * (layer + 2 * f["hidden"]), quantize_ram)
    if "verify" in stages:
        chunks = -(-windows // 8)  # the reference quantizes every layer once per chunk of 8 windows
        reads = (2 * n * b_out + chunks * n * (b_in + b_out)) / DISK_READ_BPS
        work = candidates * (chunks * quantize_s + 2 * forward(vtok) + reads)
        add(
            "verify",
            LIBRARIES_RAM + adapter_ram + (layer_ram + 0.3e9 if layerwise else model_ram + 2**30),
            0,
            startup_s + VERIFY_OVER_BOUND * work,
            gpu_bytes=n * b_out,  # lockstep: the reference and the merged model scored window by window, no store
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
        # GPTQModel: every layer forward twice on the calibration tokens, then each linear's solve
        gptq_s = len(settings) * (2 * forward(calib) + GPTQ_SOLVE_FLOP_FACTOR * f["solve"] / flops)
        if layerwise:  # disk offload: one layer in float32 with its Hessians; the save holds the
            # embeddings and head in float32 and copies each once more while writing
            ram = LIBRARIES_RAM + max(
                4 * layer + 3 * 4 * max(gptq.linear_in_features(base.shapes()).values(), default=0) ** 2,
                1.5 * 2 * 4 * rest,
            )
        else:
            ram = n * 4 + 4 * calib * f["hidden"] * 4 + 2**30
        add(
            "requantize",
            ram,
            disk,
            startup_s + gptq_s,
            gpu_bytes=n * 2,
            # GPTQModel's offload folder (measured: the float32 embeddings and head, the packed layers)
            scratch=4 * rest + nq if layerwise else 0,
        )
    e = cfg.eval
    if "evaluate" in stages:
        etok = sum(e.seq_len * max(1, (d.max_tokens or max(4096, 8 * e.seq_len)) // e.seq_len) for d in e.datasets)
        n_variants = len(e.variants) + len(e.baselines) + len(rq.alternatives) + 1
        add(
            "evaluate",
            # the reference's log-probs are kept in RAM when they fit in 1 GB (eval.metrics.ReferenceCache)
            LIBRARIES_RAM
            + adapter_ram
            + (layer_ram + 0.3e9 if layerwise else model_ram + 2**30)
            + (store(etok) if store(etok) <= 1e9 else 0),
            3 * 2**20,
            n_variants * forward(etok) * (3 if e.tasks else 1),
            gpu_bytes=n * b_out,
        )
    persistent = sum(s["disk_bytes"] for s in out.values())
    return {
        "model": f,
        "device": "cuda" if gpu else "cpu",
        "layerwise": layerwise,
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
