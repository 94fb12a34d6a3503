"""`model.impl=mcore`: the hybrid language model built on megatron-core, for tensor, sequence,
context and pipeline parallelism.

megatron-core's `MambaModel` and `MambaStack` carry the layers; the layers come from a module spec
(`spec`) whose Mamba mixer, core attention and norms are ours (`layers`): they call the same op
backends as the native model (`train.ops.dispatch`: torch references on CPU, mamba-ssm /
causal-conv1d / flash-attn / Transformer Engine kernels on GPU), so the two engines compute the
same function, and megatron's stock Mamba mixer (which needs mamba-ssm even to be built) is never
instantiated. `weights` maps native (transformers Nemotron-H) parameter names to megatron's and
splits / joins them over tensor-parallel ranks. `compat` holds what megatron-core 0.16.1 needs to
run on CPU with gloo, active only on CPU. Nothing outside this package imports megatron.
"""
