"""Pipeline parallelism: micro-batches through the stages of a pipeline-parallel model, in the
non-interleaved 1F1B order (megatron's `forward_backward_pipelining_without_interleaving`).

megatron-core splits the layers (`MambaModel` with `pre_process` / `post_process`, an equal run of
the pattern per stage): the first stage also runs the vision tower, the projector and the
embedding, the last the final norm, the head and the loss (`VisionLanguageModel.forward` returns
a stage's output activations before the last stage). This module moves those activations forward
and their gradients back between neighbouring stages with point-to-point sends on the pipeline
group, so at most `pipeline_parallel - stage` micro-batches are in flight on a stage.

The schedule is ours rather than megatron's: megatron's allocates on "cuda" by name (CPU runs
use gloo) and expects megatron's DDP and loss conventions, while the loop here keeps the
trainer's own normalisation (each micro-batch's loss sum times `scale`) and leaves the gradient
reduction over data-parallel replicas to the caller (`train.parallel.distributed.average_gradients`), after the last
micro-batch. The loss sum comes back on every stage, so reductions after it are the same on
every rank.
"""

from __future__ import annotations

import contextlib
from collections import deque

import torch
import torch.distributed as dist
from torch import Tensor, nn

from data_pipelines.training.batch import PackedBatch
from train.parallel.distributed import DistInfo


class PipelineSchedule:
    def __init__(self, model: nn.Module, info: DistInfo, autocast=None):
        """`model`: this stage's VisionLanguageModel (its language model a pipeline stage of
        `McoreLanguageModel`); `autocast`: a context-manager factory for each forward."""
        self.model, self.info = model, info
        self.lm = model.language_model
        self.group = self.lm.pp_group
        ranks = dist.get_process_group_ranks(self.group)
        stage = self.lm.pp_rank
        self.prev_rank = ranks[stage - 1] if stage > 0 else None
        self.next_rank = ranks[stage + 1] if stage + 1 < len(ranks) else None
        self.last_rank = ranks[-1]
        self.stages, self.stage = len(ranks), stage
        self.autocast = autocast

    # -- what flows between stages ---------------------------------------------------------------------
    def _activation_shape(self, batch: PackedBatch) -> tuple[int, int, int]:
        """A stage's output: every token of the micro-batch as one packed row (T, 1, D), T split over
        context-parallel ranks and, under sequence parallelism, over tensor-parallel ranks."""
        tokens = batch.input_ids.numel() // self.lm.cp_size
        if self.lm.sequence_parallel:
            tokens //= self.lm.tp_size
        return tokens, 1, self.lm.cfg.hidden_size

    def _exchange(self, send: Tensor | None, send_to: int | None, recv_shape: tuple[int, ...] | None,
                  recv_from: int | None) -> Tensor | None:
        """Send `send` to one neighbour and receive a tensor from one, both posted before either
        waits (neighbours that send to each other at once never deadlock)."""
        works, received = [], None
        if recv_from is not None and recv_shape is not None:
            received = torch.empty(recv_shape, dtype=self.lm.params_dtype, device=self.info.device)
            works.append(dist.irecv(received, src=recv_from, group=self.group))
        if send_to is not None and send is not None:
            works.append(dist.isend(send.detach().to(self.lm.params_dtype).contiguous(), dst=send_to, group=self.group))
        for work in works:
            work.wait()
        return received

    # -- one micro-batch -------------------------------------------------------------------------------
    def _forward(self, batch: PackedBatch, stage_input: Tensor | None) -> Tensor:
        """The stage's output activations, or on the last stage the micro-batch's loss sum."""
        if stage_input is not None:
            stage_input.requires_grad_(torch.is_grad_enabled())
            self.lm.set_input_tensor(stage_input)
        with (self.autocast or contextlib.nullcontext)():
            output, _ = self.model(batch.to(self.info.device))
        return output

    def _shared_loss(self, loss_sum: float) -> float:
        """The last stage's loss sum, on every stage of the pipeline."""
        value = torch.tensor([loss_sum], dtype=torch.float64)
        dist.broadcast(value, src=self.last_rank, group=self.group)
        return float(value.item())

    # -- a step ----------------------------------------------------------------------------------------
    def train(self, batches: list[PackedBatch], scale: float) -> float:
        """Forward and backward of every micro-batch (gradients of `loss_sum * scale` accumulate in
        the parameters); returns the loss sum over the micro-batches."""
        first, last = self.prev_rank is None, self.next_rank is None
        shapes = [self._activation_shape(b) for b in batches]
        warmup = min(self.stages - self.stage - 1, len(batches))
        in_flight: deque[tuple[Tensor | None, Tensor]] = deque()
        loss_sum = 0.0
        forward_i = backward_i = 0

        def run_forward(stage_input: Tensor | None) -> Tensor:
            nonlocal forward_i, loss_sum
            output = self._forward(batches[forward_i], stage_input)
            if last:
                loss_sum += float(output.detach())
                output = output * scale
            in_flight.append((stage_input, output))
            forward_i += 1
            return output

        def run_backward(output_grad: Tensor | None) -> Tensor | None:
            nonlocal backward_i
            stage_input, output = in_flight.popleft()
            torch.autograd.backward(output, grad_tensors=None if last else output_grad.to(output.dtype))
            backward_i += 1
            return None if first else stage_input.grad

        def recv_forward(i: int) -> Tensor | None:
            return self._exchange(None, None, shapes[i], self.prev_rank)

        # Warm-up: forwards only, filling the pipeline behind this stage.
        for _ in range(warmup):
            output = run_forward(recv_forward(forward_i))
            self._exchange(None if last else output, self.next_rank, None, None)
        # Steady state: one forward, one backward.
        stage_input = recv_forward(forward_i) if forward_i < len(batches) else None
        while forward_i < len(batches):
            output = run_forward(stage_input)
            output_grad = self._exchange(None if last else output, self.next_rank,
                                         None if last else shapes[backward_i], self.next_rank)
            input_grad = run_backward(output_grad)
            more = forward_i < len(batches)
            stage_input = self._exchange(input_grad, self.prev_rank, shapes[forward_i] if more else None,
                                         self.prev_rank if more else None)
        # Cool-down: the backwards of the warm-up forwards.
        while backward_i < len(batches):
            output_grad = self._exchange(None, None, None if last else shapes[backward_i], self.next_rank)
            self._exchange(run_backward(output_grad), self.prev_rank, None, None)
        return self._shared_loss(loss_sum)

    @torch.no_grad()
    def loss(self, batch: PackedBatch) -> float:
        """The loss sum of one micro-batch, forward only (validation), on every stage."""
        stage_input = self._exchange(None, None, self._activation_shape(batch), self.prev_rank)
        output = self._forward(batch, stage_input)
        if self.next_rank is not None:
            self._exchange(output, self.next_rank, None, None)
            return self._shared_loss(0.0)
        return self._shared_loss(float(output))

