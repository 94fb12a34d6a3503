"""Our torch reference language model vs transformers' NemotronH on its pure-torch path: forward +
backward of one full row, same config and weights (moved by our converter), each measurement in a
fresh process (peak RSS is per process), the two implementations interleaved, best of two rounds.

Config (issue 16): hidden 256, pattern `M-M*M-M-`, 8 query / 2 KV heads of 32, Mamba 8 heads x 64,
state 64, 2 groups, chunk 128, vocab 4096; 2 threads. Also ours on a packed row of 8 samples
(transformers cannot isolate packed samples), and ours compiled (`model.compile=true`, inductor):
a step after two warm-up steps, beside the warm-up's seconds. Ratios are ours / transformers (eager).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LENGTHS = (1024, 4096, 8192, 16384)
ROUNDS = 2
THREADS = "2"
CONFIG = dict(vocab_size=4096, hidden_size=256, hybrid_override_pattern="M-M*M-M-", num_attention_heads=8,
              num_key_value_heads=2, head_dim=32, mamba_num_heads=8, mamba_head_dim=64, ssm_state_size=64, n_groups=2,
              chunk_size=128, conv_kernel=4, intermediate_size=1024, layer_norm_epsilon=1e-5)


def _save_model(directory: Path) -> None:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    torch.manual_seed(0)
    NemotronHForCausalLM(NemotronHConfig(**CONFIG)).save_pretrained(directory)


def _measure(which: str, directory: str, tokens: int, packed: bool) -> dict:
    """In a fresh process: one forward + backward; seconds and peak RSS of this process. "ours_compiled"
    (`model.compile=true`): two forward + backward passes compile the layers (their seconds are
    `warmup_seconds`), the third is timed."""
    import torch

    torch.set_num_threads(int(THREADS))
    ids = torch.randint(0, CONFIG["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(0))
    if which == "transformers":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).train()
        forward = lambda: model(ids, use_cache=False).logits  # noqa: E731
    else:
        from train.api import load_language_model

        model = load_language_model(directory).train()
        cu = torch.linspace(0, tokens, 9).round().to(torch.int32) if packed else None
        forward = lambda: model(ids, cu_seqlens=cu)  # noqa: E731
    for p in model.parameters():
        p.requires_grad_(True)
    warmup = 0.0
    if which == "ours_compiled":
        from train.model.compile import compile_language_model

        compile_language_model(model)
        started = time.perf_counter()
        for _ in range(2):
            forward().float().sum().backward()
        warmup = time.perf_counter() - started
    started = time.perf_counter()
    forward().float().sum().backward()
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {**result, "warmup_seconds": warmup} if warmup else result


def _run_worker(which: str, directory: Path, tokens: int, packed: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    out = subprocess.run([sys.executable, "-m", "tests.bench.bench_vs_transformers", "--worker", which, str(directory),
                          str(tokens), "packed" if packed else "row"],
                         capture_output=True, text=True, env=env, timeout=1800,
                         cwd=Path(__file__).resolve().parents[2])
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "hf"
        _save_model(directory)
        for tokens in LENGTHS:
            best: dict[str, dict] = {}
            for _ in range(ROUNDS):  # interleaved: a slow moment of the machine hits both
                for which in ("transformers", "ours"):
                    result = _run_worker(which, directory, tokens)
                    if "error" in result:
                        best[which] = result
                        continue
                    previous = best.get(which)
                    if previous is None or "error" in previous or result["seconds"] < previous["seconds"]:
                        best[which] = result
            packed = _run_worker("ours", directory, tokens, packed=True)
            compiled = _run_worker("ours_compiled", directory, tokens)
            rows.append({"tokens": tokens, "transformers": best["transformers"], "ours": best["ours"],
                         "ours_packed_8": packed, "ours_compiled": compiled})
    for row in rows:
        t, o = row["transformers"], row["ours"]
        if "error" not in t and "error" not in o:
            row["time_ratio"] = o["seconds"] / t["seconds"]
            row["memory_ratio"] = o["peak_rss_mib"] / t["peak_rss_mib"]
        if "error" not in t and "error" not in row["ours_compiled"]:
            row["compiled_time_ratio"] = row["ours_compiled"]["seconds"] / t["seconds"]
    return {"config": CONFIG, "threads": int(THREADS), "rounds": ROUNDS, "rows": rows}


def render(data: dict) -> str:
    def cell(result: dict, key: str, fmt: str) -> str:
        return "error" if "error" in result else format(result[key], fmt)

    lines = ["| tokens | transformers s | ours s | ratio | transformers MiB | ours MiB | ratio | ours packed x8 s "
             "| ours compiled s (warm-up s) | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        t, o, p, c = row["transformers"], row["ours"], row["ours_packed_8"], row.get("ours_compiled", {"error": ""})
        compiled = "error" if "error" in c else f"{c['seconds']:.2f} ({c['warmup_seconds']:.0f})"
        lines.append(f"| {row['tokens']:,} | {cell(t, 'seconds', '.2f')} | {cell(o, 'seconds', '.2f')} | "
                     f"{row.get('time_ratio', float('nan')):.2f} | {cell(t, 'peak_rss_mib', ',.0f')} | "
                     f"{cell(o, 'peak_rss_mib', ',.0f')} | {row.get('memory_ratio', float('nan')):.2f} | "
                     f"{cell(p, 'seconds', '.2f')} | {compiled} | {row.get('compiled_time_ratio', float('nan')):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--worker":
    print(json.dumps(_measure(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "packed")))
