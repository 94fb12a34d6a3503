"""Interchange with transformers: Nemotron-H / Nemotron-H Omni configs and weights to and from the
native model. `config`: config.json <-> our config; `mapping`: the one table of where each tensor
lives in an HF checkpoint and in megatron-core (read by the converter and the megatron engine alike);
`files`: safetensors directories; `conversion`: hf_to_native / native_to_hf built from those;
`serving`: the tokenizer, generation and processor files an export ships; `compose`: LM + RADIO +
a fresh projector -> a Stage 0 start."""
