"""Step a of device_check.sh: what this machine is, and whether everything the checks import imports.

Prints the GPU, driver, CUDA and nvcc, the versions of torch / triton / transformers, each kit
package (imported, with its version) and each kernel backend's import state, then one
`DEVCHECK {json}` line with all of it. Exits 1 when a kit package fails to import or (with
`--require-cuda`) when torch sees no GPU. `python -m tests.device.env_report` also runs on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys

# Distribution -> module of each package the kit brings (wheels/ of .devcheck).
KIT_PACKAGES = {
    "hydra-core": "hydra", "omegaconf": "omegaconf", "antlr4-python3-runtime": "antlr4",
    "braceexpand": "braceexpand", "webdataset": "webdataset", "megatron-core": "megatron.core",
    "mamba-ssm": "train.ops.backends.mamba_ssm",  # through our loader: it copes with the missing CUDA extension
}
IMAGE_PACKAGES = ("torch", "triton", "transformers", "numpy", "einops", "pytest", "setuptools", "wheel", "ninja")


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_output(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    return result.stdout.strip() or result.stderr.strip() or None


def import_error(module: str) -> str | None:
    try:
        loaded = importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - any failure to import is the finding
        return f"{type(err).__name__}: {err}"
    error = getattr(loaded, "IMPORT_ERROR", None)  # a backend module keeps its library's import error
    return None if error is None else f"{type(error).__name__}: {error}"


def gpu_report() -> dict:
    try:
        import torch
    except Exception as err:  # noqa: BLE001 - reported: every other step fails on it too
        return {"cuda_available": False, "torch_import_error": f"{type(err).__name__}: {err}"}

    report: dict = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if report["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        report.update(name=props.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                      multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                      bf16=torch.cuda.is_bf16_supported())
    smi = command_output("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    report["driver"] = smi.splitlines()[0] if smi else None
    nvcc = command_output("nvcc", "--version")
    report["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    return report


def backend_report() -> dict[str, str]:
    try:
        from train.ops.backends import BACKENDS
    except Exception as err:  # noqa: BLE001 - the project itself does not import: that is the finding
        return {"train.ops.backends": f"{type(err).__name__}: {err}"}

    states = {}
    for op, choices in BACKENDS.items():
        for name, backend in choices.items():
            if not backend.is_reference:
                error = import_error(backend.module)
                states[f"{op}={name}"] = "ok" if error is None else error[:160]
    return states


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 when torch sees no GPU")
    args = parser.parse_args(argv)
    report = {
        "python": platform.python_version(), "executable": sys.executable,
        "gpu": gpu_report(),
        "versions": {name: version(name) for name in IMAGE_PACKAGES},
        "kit": {dist: {"version": version(dist), "import_error": import_error(module)}
                for dist, module in KIT_PACKAGES.items()},
        "backends": backend_report(),
    }
    for section in ("gpu", "versions", "kit", "backends"):
        print(f"{section}:")
        for key, value in report[section].items():
            print(f"  {key:<32} {value}")
    broken = [dist for dist, state in report["kit"].items() if state["import_error"]]
    problems = [f"kit packages that do not import: {broken}"] if broken else []
    if args.require_cuda and not report["gpu"]["cuda_available"]:
        problems.append("torch sees no CUDA GPU")
    print("DEVCHECK " + json.dumps({"gpu": report["gpu"], "versions": report["versions"], "python": report["python"],
                                    "kit_import_errors": broken, "backends": report["backends"]}))
    for problem in problems:
        print(f"env_report: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
