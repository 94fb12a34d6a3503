"""Training side of hybrid-vl-sft: config, model, ops, loop, checkpoints, entry points.

Nothing here imports Transformer Engine or mamba-ssm at import time: GPU backends are
imported lazily, each in exactly one module, so a CPU install (or a broken TE) never
breaks `import train`.
"""
