"""`model.compile=true`: torch.compile the blocks of the native model in place.

Each language-model layer and vision block is compiled on its own (`nn.Module.compile`: parameter
names, state dicts and checkpoints stay as they are, and FSDP2 / DDP wrap the model unchanged).
Inductor fuses the elementwise work between the reference ops (whose heavy parts, the SSD scan,
conv and norms, are hand-written autograd Functions already).
The parts that depend on the data, the handling of sample boundaries (`nonzero` over `seq_idx`,
per-sample attention), break the graph and run eagerly, so a new packing never recompiles them.
"""

from __future__ import annotations

from train.model.language_model import HybridLanguageModel
from train.model.vlm import VisionLanguageModel


def compile_blocks(model: VisionLanguageModel, backend: str = "inductor") -> None:
    """Compile every language-model layer and vision block of `model` in place with `backend`."""
    compile_language_model(model.language_model, backend)
    for block in model.vision_model.blocks:
        block.compile(backend=backend)


def compile_language_model(model: HybridLanguageModel, backend: str = "inductor") -> None:
    for layer in model.backbone.layers:
        layer.compile(backend=backend)
