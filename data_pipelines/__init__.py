"""Data pipelines: shards -> decode -> tokens + media tensors -> packed batches.

Ground floor of the project: nothing here imports `train`.
"""
