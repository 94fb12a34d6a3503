"""`model.impl=mcore`: the hybrid language model built on megatron-core, for tensor, sequence,
context and pipeline parallelism.

megatron-core's `MambaModel` and `MambaStack` carry the layers; the layers come from a module spec
(`spec`) whose Mamba mixer, core attention and norms are ours (`layers`): they call the same op
backends as the native model (`train.ops.dispatch`: torch references on CPU, mamba-ssm /
causal-conv1d / flash-attn / Transformer Engine kernels on GPU), so the two engines compute the
same function, and megatron's stock Mamba mixer (which needs mamba-ssm even to be built) is never
instantiated. `weights` maps native (transformers Nemotron-H) parameter names to megatron's and
splits / joins them over tensor-parallel ranks. `compat` holds what megatron-core 0.16.1 needs to
run on CPU with gloo, active only on CPU. `engine` is this room's `Engine` (process groups,
precision, the 1F1B `pipeline` schedule, the native-layout checkpoint `state`); `fp8` is megatron's
FP8 state as a precision plugin; `rules` its config checks. Nothing outside this package imports megatron.
"""

import warnings

# megatron-core's warnings that ask nothing of a user of this engine, silenced here, once, before
# this package imports megatron (each printed once per rank otherwise: 24 lines before step 1 at TP=2).
_HARMLESS = (
    # Its fused optimizer kernels: this engine builds its own optimizer and never uses them.
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    # Its own TransformerConfig default (cuda_graph_scope), whatever the user sets.
    (UserWarning, r"full scope is deprecated"),
    # megatron's calls into torch 2.13's renamed collectives: same operations.
    (FutureWarning, r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"),
    # Checkpoints of this engine hold native tensors as ShardedTensor chunks (`state`), read back by DCP.
    (Warning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
)
for _category, _message in _HARMLESS:
    warnings.filterwarnings("ignore", message=_message, category=_category)
