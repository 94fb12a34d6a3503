"""The model in plain PyTorch, shared by both engines: hybrid LM, ViT, projector, the VLM that joins
them, the chunked loss and EVS. The megatron-core engine swaps in its own language model and loss
(`train.engines.mcore`); the vision tower and projector are these modules on either engine."""
