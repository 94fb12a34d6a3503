"""Data pipelines: shards -> decode -> tokens + media tensors -> packed batches.

`training/` is the path training reads through. The tools users run on their data sit at this
level, each module its own CLI (`python -m data_pipelines.<tool>`): `synth` (the embedded
synthetic data), `convert` (jsonl / LLaVA / HF datasets -> shards), `lint`, `inspect`, and
`tokenizer_train` (the embedded data's tokenizer). They are built on the training path so they
see what training sees. Ground floor of the project: nothing here imports `train`.
"""
