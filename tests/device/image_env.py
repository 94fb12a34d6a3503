"""The GPU image's Python packages, simulated with this venv: a way to run code here that sees only
what the GPU test machine's python3 has (plus the kit), so a missing wheel shows on CPU first.

`image_view(dest)` fills `dest` with symbolic links to the entries of the venv's site-packages that
belong to the image's distributions (the list below and what they require, per the venv's metadata),
dist-info folders included, so `importlib.metadata` and pytest's plugin discovery see only those.
`image_python(...)` is the command and environment that run the venv's interpreter with no site
(`-S`) and `PYTHONPATH` = the repository, the kit's install folder, the view: every other package of
the venv is invisible, and the kit's copy of a package is the one imported.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
# What the GPU image's python3 has (its other packages are left out: what the checks need must be in
# this list, their requirements or the kit). pip, setuptools, wheel and packaging build causal-conv1d there.
IMAGE = ("torch", "triton", "transformers", "einops", "numpy", "pillow", "pytest", "pyyaml", "safetensors",
         "tokenizers", "accelerate", "peft", "torchvision", "matplotlib", "opencv-python-headless", "pip",
         "setuptools", "wheel", "packaging")
# Not in the image, whatever requires them: the kit brings the first ones; the rest must stay unimported.
ABSENT = ("hydra-core", "omegaconf", "antlr4-python3-runtime", "braceexpand", "webdataset", "megatron-core",
          "mamba-ssm", "causal-conv1d", "av", "decord", "wandb", "datasets", "lm-eval", "flash-attn",
          "transformer-engine")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_distributions() -> dict[str, importlib.metadata.Distribution]:
    """The venv's distributions that the image has: IMAGE and everything they require, minus ABSENT."""
    installed = {normalise(d.metadata["Name"]): d for d in importlib.metadata.distributions()}
    absent = {normalise(n) for n in ABSENT}
    chosen: dict[str, importlib.metadata.Distribution] = {}
    todo = [normalise(n) for n in IMAGE]
    while todo:
        name = todo.pop()
        if name in chosen or name in absent or name not in installed:
            continue
        chosen[name] = installed[name]
        for line in chosen[name].requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(normalise(requirement.name))
    return chosen


def image_view(dest: Path) -> Path:
    """Symlinks to the site-packages entries (packages, modules, dist-info) of the image's distributions."""
    dest.mkdir(parents=True, exist_ok=True)
    for dist in image_distributions().values():
        site = Path(dist.locate_file(""))
        entries = {Path(f).parts[0] for f in dist.files or []}  # RECORD lists the dist-info folder too
        for entry in entries:
            source = site / entry
            if entry in ("..", "__pycache__") or entry.endswith(".pth") or not source.exists():
                continue
            link = dest / entry
            if not link.exists():
                link.symlink_to(source)
    return dest


def image_python(view: Path, kit_site: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """(command, environment) running `python -S ARGS` as the image's python3 with the kit installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(kit_site), str(view)]), PYTHONNOUSERSITE="1",
               PYTHONDONTWRITEBYTECODE="1", MPLBACKEND="Agg")
    return [sys.executable, "-S", *args], env
