"""Data pipelines: shards -> decode -> tokens + media tensors -> packed batches.

`training/` is the path training reads through; `tools/` holds what users run on their data
(`python -m data_pipelines.synth|convert|lint|inspect`, thin entry points at this level).
Ground floor of the project: nothing here imports `train`.
"""
