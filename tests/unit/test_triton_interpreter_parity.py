"""mamba-ssm's Triton kernels vs the torch references, on CPU, under Triton's interpreter.

The same calls the model makes (``load_backend("ssd" | "gated_norm" | "rms_norm", "mamba_ssm")``,
i.e. train/ops/backends/mamba_ssm.py) run the real kernels with ``TRITON_INTERPRET=1``, on the
mamba-ssm that `make setup` installs without CUDA, against :func:`ssd_scan_ref`,
:func:`gated_rms_norm_ref` and :func:`rms_norm_ref`: forward and backward (every input's
gradient), float32 to ~1e-6 (the interpreter multiplies in true float32), plus one bfloat16 case
each with bf16 tolerances. This checks what the GPU test machine cannot cheaply check in CI: the
calling conventions (argument names and layouts, which inputs get gradients, final-state dtype)
and the kernels' semantics at the edges the model meets: ``seq_idx`` boundaries inside a chunk
and on a chunk edge, initial states on a row whose first sample index is not 0, D of shape (h,)
and (h, p), ``dt_limit`` clamping on both sides, lengths that chunk sizes do not divide,
several heads per group and one head per group.

What it cannot see: TF32 in ``tl.dot`` (the interpreter multiplies in float32), races and atomics
ordering (programs run one after another), shared-memory and register limits, the launch
configurations autotuning would pick on a GPU (one config per kernel here), and Triton compiler
bugs. tests/gpu/test_kernel_parity.py covers those on a GPU.

All cases run in ONE subprocess (`python -m tests.unit.test_triton_interpreter_parity OUT.json`,
set up by tests/unit/triton_interpreter.py): the interpreter has to be chosen before mamba_ssm
is imported and its patches are process-wide, while this pytest process has imported triton
already (megatron-core). Each test below then checks its case's errors from that run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
# (forward, backward) bounds on max|kernel - ref| / max|ref|, per input dtype.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 2e-2)}


@dataclass(frozen=True)
class SsdCase:
    """One call of the SSD scan: shapes (b, l, h, p, g, n), chunk size and options."""

    b: int = 2
    l: int = 40
    h: int = 4
    p: int = 8
    g: int = 2
    n: int = 8
    chunk_size: int = 16
    rows: list[list[int]] | None = None  # sample lengths per row -> seq_idx; None: no seq_idx
    d_per_channel: bool = False  # D (h, p) instead of (h,)
    gate: bool = True  # z
    dt_softplus: bool = True  # and a dt_bias
    dt_limit: tuple[float, float] = (0.0, math.inf)
    initial_states: bool = False
    final_states: bool = False
    dtype: str = "float32"


# Chunk 16 unless said: boundaries at 5 (inside chunk 0) and 16 (a chunk edge) in row 0, at 20
# (inside chunk 1) and 32 (an edge) in row 1; l = 40 is not a multiple of 16.
PACKED = [[5, 11, 24], [20, 12, 8]]
SSD_CASES = {
    "packed_boundaries_inside_and_on_chunk_edges": SsdCase(rows=PACKED),
    # Row 1's first sample has index 3 (the packer numbers samples over the whole batch): the
    # initial state applies to row 0's first sample only. Final states (and their gradient) too.
    "initial_states_and_a_row_starting_past_index_0": SsdCase(rows=PACKED, initial_states=True, final_states=True,
                                                             gate=False),
    "initial_and_final_states_without_seq_idx": SsdCase(l=48, initial_states=True, final_states=True),
    # One partial chunk (64 > l = 40) holding every boundary; dt clamped at both ends.
    "d_per_channel_dt_limit_one_partial_chunk": SsdCase(rows=PACKED, chunk_size=64, d_per_channel=True,
                                                        dt_limit=(0.05, 0.3)),
    "dt_limit_without_softplus": SsdCase(rows=[[13, 27], [40]], dt_softplus=False, dt_limit=(0.01, 0.2), gate=False),
    # One head per group; chunk 8 over an odd length: five chunks, the last of 5 tokens, and a
    # boundary at 3 (inside chunk 0) and 11 (inside chunk 1). One row: small chunks are slow here.
    "one_head_per_group_small_chunks": SsdCase(b=1, l=37, g=4, chunk_size=8, rows=[[3, 8, 26]]),
    "bf16_packed_with_final_states": SsdCase(rows=PACKED, final_states=True, dtype="bfloat16"),
}


@dataclass(frozen=True)
class NormCase:
    op: str  # "gated_norm" | "rms_norm"
    d: int
    group_size: int | None = None
    norm_before_gate: bool = False
    dtype: str = "float32"


NORM_CASES = {
    "gated_norm_after_gate_two_groups": NormCase("gated_norm", 96, group_size=48),
    "gated_norm_before_gate_whole_row": NormCase("gated_norm", 80, norm_before_gate=True),
    "gated_norm_bf16": NormCase("gated_norm", 64, group_size=32, dtype="bfloat16"),
    "rms_norm": NormCase("rms_norm", 80),
}


def _seq_idx(rows: list[list[int]]) -> Tensor:
    """(b, l) int32 sample index numbered over the whole batch, as the packer writes it."""
    ids, sample = [], 0
    for lengths in rows:
        row = []
        for n in lengths:
            row += [sample] * n
            sample += 1
        ids.append(row)
    return torch.tensor(ids, dtype=torch.int32)


def ssd_call(case: SsdCase) -> tuple[dict[str, Tensor], dict]:
    """The differentiable inputs (in the case's dtype; A, D, dt_bias, initial states float32 as the
    model keeps them) and the static keyword arguments."""
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, g, n = case.b, case.l, case.h, case.p, case.g, case.n
    dtype = getattr(torch, case.dtype)

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen)

    inputs = {
        "x": randn(b, l, h, p).to(dtype),
        # Spread wide so that dt_limit clamps some steps at each end.
        "dt": (randn(b, l, h, scale=1.5) if case.dt_softplus else torch.rand(b, l, h, generator=gen) * 0.3).to(dtype),
        "A": -torch.linspace(0.5, 2.0, h),
        "B": randn(b, l, g, n).to(dtype),
        "C": randn(b, l, g, n).to(dtype),
        "D": 1 + randn(*((h, p) if case.d_per_channel else (h,)), scale=0.5),
    }
    if case.gate:
        inputs["z"] = randn(b, l, h, p).to(dtype)
    if case.dt_softplus:
        dt0 = torch.linspace(0.01, 0.1, h)
        inputs["dt_bias"] = dt0 + torch.log(-torch.expm1(-dt0))  # softplus^-1, as the model initialises it
    if case.initial_states:
        inputs["initial_states"] = randn(b, h, p, n)
    static = dict(chunk_size=case.chunk_size, dt_softplus=case.dt_softplus, dt_limit=case.dt_limit,
                  return_final_states=case.final_states)
    if case.rows is not None:
        static["seq_idx"] = _seq_idx(case.rows)
    return inputs, static


def norm_call(case: NormCase) -> tuple[dict[str, Tensor], dict]:
    gen = torch.Generator().manual_seed(1)
    dtype = getattr(torch, case.dtype)
    inputs = {"x": torch.randn(3, 7, case.d, generator=gen).to(dtype),
              "weight": 1 + 0.1 * torch.randn(case.d, generator=gen)}
    static: dict = {"eps": 1e-5}
    if case.op == "gated_norm":
        inputs["z"] = torch.randn(3, 7, case.d, generator=gen).to(dtype)
        static.update(group_size=case.group_size, norm_before_gate=case.norm_before_gate)
    return inputs, static


def _forward_backward(fn: Callable, inputs: dict[str, Tensor], static: dict, upstream: list[Tensor] | None
                      ) -> tuple[list[Tensor], dict[str, Tensor], list[Tensor]]:
    """Outputs, every input's gradient, and the upstream gradients used (random when None)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    outs = fn(**leaves, **static)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    if upstream is None:
        gen = torch.Generator().manual_seed(2)
        upstream = [torch.randn(o.shape, generator=gen) for o in outs]
    torch.autograd.backward(outs, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return [o.detach() for o in outs], {k: leaf.grad for k, leaf in leaves.items()}, upstream


def _rel_err(actual: Tensor, expected: Tensor) -> float:
    if actual.shape != expected.shape:
        return math.inf
    err = (actual.float() - expected.float()).abs().max().item()
    return err / max(expected.float().abs().max().item(), 1e-6)


def compare(kernel: Callable, ref: Callable, inputs: dict[str, Tensor], static: dict) -> dict:
    """The kernel on `inputs` vs the reference on their float32 copies, with the same upstream
    gradients: {"forward": {output: err}, "backward": {input: err}, "dtypes": [output dtypes]}."""
    ref_outs, ref_grads, upstream = _forward_backward(ref, {k: v.float() for k, v in inputs.items()}, static, None)
    outs, grads, _ = _forward_backward(kernel, inputs, static, upstream)
    names = ["y", "final_states"][:len(outs)]
    return {"forward": {name: _rel_err(o, r) for name, o, r in zip(names, outs, ref_outs)},
            "backward": {name: _rel_err(grads[name], ref_grads[name]) for name in inputs},
            "dtypes": [str(o.dtype).removeprefix("torch.") for o in outs]}


def run_all_cases() -> dict[str, dict]:
    """Every case through the project's mamba_ssm backends (call after triton_interpreter.install())."""
    from train.ops import gated_rms_norm_ref, rms_norm_ref, ssd_scan_ref
    from train.ops.dispatch import load_backend

    refs = {"ssd": ssd_scan_ref, "gated_norm": gated_rms_norm_ref, "rms_norm": rms_norm_ref}
    calls = [(f"ssd/{name}", "ssd", ssd_call, case) for name, case in SSD_CASES.items()]
    calls += [(f"norm/{name}", case.op, norm_call, case) for name, case in NORM_CASES.items()]
    results = {}
    for key, op, make_call, case in calls:
        start = time.perf_counter()
        try:
            inputs, static = make_call(case)
            results[key] = compare(load_backend(op, "mamba_ssm"), refs[op], inputs, static)
        except Exception:  # one broken case must not hide the others' results
            results[key] = {"error": traceback.format_exc()}
        results[key]["seconds"] = round(time.perf_counter() - start, 2)
    return results


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory) -> dict[str, dict]:
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed (`make setup` installs it without CUDA)")
    out = tmp_path_factory.mktemp("triton_interpreter") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.unit.test_triton_interpreter_parity", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0 and out.exists(), \
        f"interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(out.read_text())


def _check(result: dict, dtype: str) -> None:
    if "error" in result:
        pytest.fail(result["error"])
    fwd, bwd = TOL[dtype]
    bad = [f"{name}: {err:.2e} > {fwd}" for name, err in result["forward"].items() if not err <= fwd]
    bad += [f"d{name}: {err:.2e} > {bwd}" for name, err in result["backward"].items() if not err <= bwd]
    assert not bad, f"kernel vs reference (max |diff| / max |ref|): {'; '.join(bad)}"


@pytest.mark.parametrize("name", SSD_CASES)
def test_ssd_scan_kernel_matches_reference(interpreter_results, name):
    case = SSD_CASES[name]
    result = interpreter_results[f"ssd/{name}"]
    _check(result, case.dtype)
    # y in x's dtype; final states float32 whatever x's dtype, as the reference's.
    assert result["dtypes"] == [case.dtype, "float32"][:1 + case.final_states]


@pytest.mark.parametrize("name", NORM_CASES)
def test_norm_kernel_matches_reference(interpreter_results, name):
    case = NORM_CASES[name]
    result = interpreter_results[f"norm/{name}"]
    _check(result, case.dtype)
    assert result["dtypes"] == [case.dtype]


def test_mamba1_selective_scan_fails_clearly_in_an_install_without_its_cuda_extension():
    """The loader's placeholder for mamba-ssm's missing CUDA extension imports, and raises once used."""
    if importlib.util.find_spec("mamba_ssm") is None:
        pytest.skip("mamba-ssm is not installed (`make setup` installs it without CUDA)")
    from train.ops.backends import mamba_ssm as backend

    assert backend.IMPORT_ERROR is None, repr(backend.IMPORT_ERROR)
    if not isinstance(sys.modules["selective_scan_cuda"], backend._MissingCudaExtension):
        pytest.skip("this mamba-ssm has its CUDA extension")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u, delta = torch.randn(1, 4, 8), torch.rand(1, 4, 8)  # (b, d, l)
    with pytest.raises(RuntimeError, match="built without its CUDA extension"):
        selective_scan_fn(u, delta, -torch.rand(4, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8))


if __name__ == "__main__":
    from tests.unit import triton_interpreter

    triton_interpreter.install()
    Path(sys.argv[1]).write_text(json.dumps(run_all_cases(), indent=1))
