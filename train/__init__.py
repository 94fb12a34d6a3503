"""Training side of hybrid-vl-sft.

Modules at this level are the command-line entry points (`python -m train`, `train.pipeline`,
`train.convert`) and the public Python API (`train.api`), all thin; each tool with machinery of its
own is a package whose `__main__` is its CLI (`plan`, `report`, `evaluate`, `chat`). The rest lives
in rooms named for what they hold: `config`, `loop`, `engines` (native / mcore), `model`, `ops`,
`precision`, `parallel`, `checkpoint`, `hf`.

Nothing here imports Transformer Engine or mamba-ssm at import time: GPU backends are
imported lazily, each in exactly one module, so a CPU install (or a broken TE) never
breaks `import train`.
"""
