"""Benchmarks of a trained run: lm-eval tasks on the exported language model (`harness`) and
answer accuracy of the vision-language model on held-out shards (`generation`)."""
