"""Shared fixtures: the embedded synthetic data (generated once per session, small)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory):
    # Imported here: writing MP4s needs PyAV, which a GPU machine running only tests/gpu may lack.
    from data_pipelines.tools.synth import ensure_embedded_data

    root = tmp_path_factory.mktemp("synth") / "data"
    return ensure_embedded_data(root, num_per_kind={"image": 24, "video": 8, "multi_image": 12, "text": 32}, seed=0)


@pytest.fixture(scope="session")
def tokenizer(synth_data):
    from data_pipelines.training.samples import Tokenizer

    return Tokenizer.load(str(synth_data.tokenizer_dir))


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent
