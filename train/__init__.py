"""Training side of hybrid-vl-sft.

Modules at this level are the command-line entry points (`python -m train`, `train.pipeline`,
`train.convert`, `train.plan`, `train.chat`) and the public Python API (`train.api`), all thin;
the machinery lives in subpackages named for what they hold: `config`, `loop`, `model`, `ops`,
`precision`, `checkpoint`, `parallel`, `hf`, `inference`, `planning`.

Nothing here imports Transformer Engine or mamba-ssm at import time: GPU backends are
imported lazily, each in exactly one module, so a CPU install (or a broken TE) never
breaks `import train`.
"""
