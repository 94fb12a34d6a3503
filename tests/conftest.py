"""Shared fixtures: the embedded synthetic data (generated once per session, small)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# `make test` runs the suite in parallel workers (pytest-xdist, one test file per worker at a time),
# which share the cores: each worker, and every trainer or torchrun it starts (they inherit
# OMP_NUM_THREADS), takes its share of threads instead of all of them.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


# The slowest test files, slowest first (seconds in the fresh-clone `make test` on a 2-core machine): run
# first, the parallel workers start on them and the short files fill in at the end, instead of one
# worker finishing a long file alone (longest-first scheduling; `make test` keeps a file on one worker).
SLOW_FILES = {
    "test_slurm_cluster.py": 140, "test_mcore_training.py": 90, "test_mcore_adapters.py": 75,
    "test_distributed_resume.py": 75, "test_smoke_pipeline.py": 70, "test_distributed_optimizer.py": 70,
    "test_readme_lines.py": 70, "test_mcore_pipeline.py": 65, "test_stage_resume.py": 65,
    "test_mcore_parallel.py": 60, "test_data_parallel.py": 55, "test_evaluate.py": 50, "test_parallel_groups.py": 40,
    "test_fp8_stage.py": 30, "test_compose.py": 27, "test_stops.py": 25, "test_processes.py": 23, "test_slurm.py": 22,
    "test_chat.py": 20, "test_samples_and_packing.py": 20, "test_triton_interpreter_parity.py": 20,
    "test_bad_input.py": 18, "test_validation_ranks.py": 18, "test_preemption.py": 18, "test_device_kit.py": 13,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.name, 0))  # stable: in-file order kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    # Imported here: writing MP4s needs PyAV, which a GPU machine running only tests/gpu may lack.
    from data_pipelines.synth import ensure_embedded_data

    root = tmp_path_factory.mktemp("synth") / "data"
    return ensure_embedded_data(root, num_per_kind={"image": 24, "video": 8, "multi_image": 12, "text": 32}, seed=0)


@pytest.fixture(scope="session")
def tokenizer(synth_data):
    from data_pipelines.training.samples import Tokenizer

    return Tokenizer.load(str(synth_data.tokenizer_dir))


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
