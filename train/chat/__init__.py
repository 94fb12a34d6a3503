"""`python -m train.chat` (`__main__`): a trained model in use. `session`: the run's model loaded
(through the assembly) and prompts rendered exactly as training renders a conversation; `generate`:
greedy decoding over the modules' own caches; `load`: the language model alone, from a native
checkpoint or a transformers directory (`train.api.load_language_model`)."""
