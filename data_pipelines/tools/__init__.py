"""Data tools users run on their own data, built on the training path so they see what training
sees: `synth` (embedded synthetic data), `convert` (jsonl / LLaVA / HF datasets -> shards), `lint`,
`inspect`, `tokenizer_train`. Each command-line tool is `python -m data_pipelines.<tool>`."""
