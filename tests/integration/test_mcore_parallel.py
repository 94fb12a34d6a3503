"""model.impl=mcore on real processes (torchrun, gloo): megatron-core's hybrid model at TP=1, TP=2,
TP=2 with sequence parallelism, CP=2 and TP=2 x CP=2 equals the native model on packed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.helpers import run_module

WORKER = str(Path(__file__).with_name("mcore_parity_worker.py"))


@pytest.mark.parametrize("tensor,context,mode", [(1, 1, "plain"), (2, 1, "plain"), (2, 1, "sp"), (1, 2, "plain"),
                                                (2, 2, "sp")])
def test_mcore_equals_native_on_packed_rows(tmp_path, tensor, context, mode):
    out = tmp_path / "parity"
    ranks = tensor * context
    result = run_module(["torch.distributed.run", "--nproc-per-node", str(ranks), WORKER, str(out), str(tensor),
                         str(context), mode], tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(ranks):
        got = json.loads(Path(f"{out}.{rank}.json").read_text())
        for pattern, diffs in got.items():
            assert diffs["samples_isolated"], pattern  # the rows really pack several samples
            for what in ("logits", "loss", "grads"):
                assert diffs[what] < 1e-5, (pattern, what, diffs)
