"""The model in plain PyTorch: hybrid LM, ViT, projector, and the VLM that joins them."""
