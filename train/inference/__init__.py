"""Inference: loading a trained model for use (`load`), the chat prompt and model (`chat_session`)
and the greedy decoding loop over the modules' own caches (`generate`)."""
