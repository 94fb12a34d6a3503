"""`make bench-gpu`: tokens/s and MFU of nano12b-shaped layers on one GPU, bf16 and FP8.

A few layers at the real 12B widths (hidden 5120, Mamba 128 x 80 heads, attention 40 / 8 heads of
128, MLP 20480), one packed 16K row of 8 samples, forward + backward under bf16 autocast, then with
every Linear in FP8 through Transformer Engine (delayed scaling). MFU counts the Linear GEMMs
(6 x parameters per token) and causal attention (QK and AV: 4 x context x query width per token,
halved by the causal mask, times 3 with the backward); the SSD scan is left out, so MFU is a lower
bound. Writes bench_results/bench_gpu.json. Needs CUDA.

Kernels (`KERNELS`): by default only ones that need no compiling: mamba-ssm's Triton SSD scan and
norms, torch's own varlen attention (torch >= 2.11), and the torch reference conv (causal-conv1d is
a CUDA build). Override per op, e.g. `--kernel conv1d=causal_conv1d --kernel attention=flash_attn`.
Each row runs on its own: a row that fails (FP8 without Transformer Engine, a missing kernel)
records its error and the others still run; the exit code is 1 only when no row ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from pathlib import Path

import torch

PATTERN = "M-M*-"  # 2 Mamba, 2 MLP, 1 attention layer: the 12B's kinds at its widths
TOKENS, SAMPLES, WARMUP, ITERS = 16384, 8, 3, 10
# Dense peak TFLOP/s per GPU (bf16, fp8), from the vendors' data sheets.
PEAK = {"H100": (989e12, 1979e12), "H200": (989e12, 1979e12), "A100": (312e12, None), "B200": (2250e12, 4500e12)}
PRECISIONS = ("bf16", "fp8_delayed")
# Chosen explicitly, never detected: what the GPU image runs without compiling anything.
KERNELS = {"ssd": "mamba_ssm", "conv1d": "torch", "attention": "torch_varlen", "gated_norm": "mamba_ssm",
           "rms_norm": "mamba_ssm"}


def model_flops_per_token(lm) -> float:
    linear = sum(p.numel() for n, p in lm.named_parameters() if p.ndim == 2 and "embeddings" not in n
                 and "lm_head" not in n)
    attention_layers = lm.cfg.pattern.count("*")
    context = TOKENS / SAMPLES  # per-sample causal attention: on average half of it is attended
    attention = attention_layers * 6 * (context / 2) * lm.cfg.num_attention_heads * lm.cfg.head_dim * 2
    return 6 * linear + attention


def measure(precision_name: str, kernel_names: dict[str, str]) -> dict:
    from train.config.schema import KernelConfig, PrecisionConfig
    from train.model.language_model import HybridLanguageModel
    from train.plan.estimate import load_plan_config
    from train.precision import build_precision

    device = torch.device("cuda")
    lm_cfg = dataclasses.replace(load_plan_config("stage1_image_sft", ["parallel=single"]).model.language_model,
                                 pattern=PATTERN)
    kernels = KernelConfig(**kernel_names)
    lm = HybridLanguageModel(lm_cfg, kernels).to(device)
    # Every layer's Linears in FP8 (a bare language model: the vision patterns match nothing here).
    keep = ["backbone.embeddings", "lm_head", "vision_model", "projector"]
    precision = build_precision(PrecisionConfig(name=precision_name, keep_first_last_layers=0, keep_patterns=keep),
                                device)
    lm = precision.convert_model(lm)
    cu = torch.arange(0, TOKENS + 1, TOKENS // SAMPLES, dtype=torch.int32, device=device)
    seq_idx = torch.repeat_interleave(torch.arange(SAMPLES, device=device, dtype=torch.int32),
                                      TOKENS // SAMPLES).unsqueeze(0)
    embeds = torch.randn(1, TOKENS, lm_cfg.hidden_size, device=device, requires_grad=True)

    def step() -> None:
        with precision.autocast():
            hidden = lm.backbone(embeds, seq_idx, cu)
        hidden.float().square().mean().backward()
        precision.after_backward()

    for _ in range(WARMUP):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(ITERS):
        step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / ITERS
    achieved = model_flops_per_token(lm) * TOKENS / seconds
    name = torch.cuda.get_device_name()
    peak = next((p for key, p in PEAK.items() if key in name), (None, None))[precision_name.startswith("fp8")]
    return {"precision": precision_name, "step_seconds": seconds, "tokens_per_second": TOKENS / seconds,
            "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "device": name}


def measure_row(precision_name: str, kernel_names: dict[str, str]) -> dict:
    """One row: its measurement, or its error; the GPU memory a failed row held is freed for the next."""
    try:
        return measure(precision_name, kernel_names)
    except Exception as err:  # noqa: BLE001 - a row's failure (missing TE, a kernel error) is its result
        error = f"{type(err).__name__}: {err}"
    gc.collect()  # the traceback, gone now, held the failed row's model and activations
    torch.cuda.empty_cache()
    return {"precision": precision_name, "error": error, "device": torch.cuda.get_device_name()}


def parse_kernels(overrides: list[str]) -> dict[str, str]:
    from train.ops.backends import BACKENDS

    kernels = dict(KERNELS)
    for override in overrides:
        op, _, name = override.partition("=")
        if op not in BACKENDS or name not in BACKENDS[op]:
            raise SystemExit(f"--kernel {override!r}: expected OP=NAME with OP in {list(BACKENDS)} and NAME one of "
                             f"{list(BACKENDS.get(op, {}))}")
        kernels[op] = name
    return kernels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", action="append", default=[], metavar="OP=NAME",
                        help=f"override one op's kernel (default {KERNELS})")
    kernels = parse_kernels(parser.parse_args(argv).kernel)
    if not torch.cuda.is_available():
        print("bench-gpu needs a CUDA GPU (and mamba-ssm for its Triton kernels)", file=sys.stderr)
        return 2
    rows = [measure_row(name, kernels) for name in PRECISIONS]
    print(f"{'precision':<12}{'step s':>9}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>7}{'peak GiB':>10}  ({rows[0]['device']}, "
          f"layers {PATTERN} at 12B widths, {TOKENS} tokens in {SAMPLES} samples)")
    print("kernels: " + ", ".join(f"{op}={name}" for op, name in kernels.items()))
    for r in rows:
        if "error" in r:
            print(f"{r['precision']:<12}failed: {r['error']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{r['precision']:<12}{r['step_seconds']:>9.3f}{r['tokens_per_second']:>12,.0f}{r['tflops']:>10.1f}"
              f"{mfu:>7}{r['peak_memory_gib']:>10.1f}")
    if not any("error" in r for r in rows):
        print(f"fp8 / bf16 tokens/s: {rows[1]['tokens_per_second'] / rows[0]['tokens_per_second']:.2f}x")
    out = Path(__file__).resolve().parents[2] / "bench_results" / "bench_gpu.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "kernels": kernels, "pattern": PATTERN, "tokens": TOKENS,
                               "samples": SAMPLES}, indent=2))
    print(f"wrote {out}")
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
