"""What megatron-core needs to run on CPU (gloo), in one place, active only when the device is CPU.

megatron-core 0.16.1 assumes CUDA in a few places our spec reaches:
- `torch.cuda.current_device()` as a `device=` argument (gathering a tensor-parallel output, the
  backward of sequence-parallel regions, ...); a CPU-only torch raises there.
- its RNG tracker forks CUDA RNG states; the inference tracker (no forks) stands in on CPU, where
  dropout is off (the spec builds no dropout).
Everything else is handled by megatron's own extension points (module specs) in `spec`.
"""

from __future__ import annotations

import warnings

import torch

TESTED_MEGATRON_CORE = "0.16.1"


def check_version() -> None:
    """megatron-core's module internals move between releases: refuse one this package was not tested with."""
    from megatron.core.package_info import __version__

    if __version__ != TESTED_MEGATRON_CORE:
        raise ImportError(f"model.impl=mcore is tested with megatron-core {TESTED_MEGATRON_CORE}, found {__version__}: "
                          f"pip install 'megatron-core=={TESTED_MEGATRON_CORE}'")


def install_cpu_support(device: torch.device) -> None:
    """On CPU: `torch.cuda.current_device()` answers "cpu", for this process (forward, backward and
    optimizer all reach it; a process computing on CPU never has a CUDA device to ask about).
    On GPU: nothing changes."""
    if device.type == "cpu":
        torch.cuda.current_device = _cpu_current_device
        # Advice for CUDA streams under sequence parallelism; there are none on CPU.
        warnings.filterwarnings("ignore", message=r".*CUDA_DEVICE_MAX_CONNECTIONS", category=UserWarning)


def _cpu_current_device() -> str:
    return "cpu"


def initialize_rng_tracker(device: torch.device) -> None:
    """megatron's model-parallel RNG tracker; on CPU the inference tracker, whose forks do nothing."""
    from megatron.core.tensor_parallel.random import initialize_rng_tracker as megatron_initialize

    megatron_initialize(inference_rng_tracker=device.type == "cpu", force_reset=True)
