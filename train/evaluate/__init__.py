"""Evaluation, in one room: held-out loss during training (`heldout`: the validation and
forgetting-monitor sources, identical at any world size), and benchmarks of a trained run behind
`python -m train.evaluate` (`__main__`): lm-eval tasks on the exported language model
(`harness`) and answer accuracy of the vision-language model on held-out shards (`generation`)."""
