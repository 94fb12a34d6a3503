"""Benchmarks through EleutherAI's lm-eval harness, on the language model of a run.

The checkpoint is exported as transformers loads it (`native_to_hf`, tokenizer and chat template
included) and handed to the harness's own `hf` model type, so scores are what anyone running
`lm_eval --model hf` on the export would get. Tasks are harness task names or paths to task YAML
files (their directories are added to the harness's task index).

Offline: unless HF_HUB_OFFLINE is set, the hub is probed once (a 3-second connect); where it cannot
be reached the harness and `datasets` run offline, and a task whose data lives on the hub and is not
in the local cache is skipped with one line saying so, while the other tasks run.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import socket
import sys
from urllib.parse import urlparse
from pathlib import Path

import yaml

from train.checkpoint.files import read_marker, resolve_native_checkpoint
from train.config.schema import ConfigError
from train.hf.conversion import native_to_hf
from train.hf.errors import ConversionError

INSTALL_HINT = "pip install -e '.[eval]' (EleutherAI's lm-eval harness)"


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked; the message says why and what to change."""


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval task YAMLs tag Python hooks (`!function utils.process_docs`): read past them, since only
    the `task:` name is needed here (the harness itself resolves the hooks)."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, tag, node: None)


def _read_task_yaml(path: Path) -> dict:
    try:
        spec = yaml.load(path.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise EvaluationError(f"task file {path} is not valid YAML{where}: {problem}") from None
    if not isinstance(spec, dict):
        raise EvaluationError(f"task file {path} holds no mapping: not an lm-eval task YAML")
    return spec


def resolve_tasks(tasks: list[str]) -> tuple[list[str], list[str]]:
    """(task names for the harness, directories with task YAMLs to index). A `.yaml` path is read
    for its `task:` name."""
    names, include = [], []
    for task in tasks:
        path = Path(task)
        if path.suffix in (".yaml", ".yml"):
            if not path.is_file():
                raise EvaluationError(f"task file {path} does not exist")
            spec = _read_task_yaml(path)
            if "task" not in spec:
                raise EvaluationError(f"{path} has no `task:` name: not an lm-eval task YAML")
            names.append(str(spec["task"]))
            if str(path.parent.resolve()) not in include:
                include.append(str(path.parent.resolve()))
        else:
            names.append(task)
    return names, include


# Builders that read local files (`data_files`), not a hub repository.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


def set_offline_mode() -> bool:
    """Whether the hub is out of reach (HF_HUB_OFFLINE as set, else a 3-second probe); sets the
    offline switches of huggingface_hub and datasets accordingly, so nothing waits on retries."""
    if "HF_HUB_OFFLINE" not in os.environ:
        from huggingface_hub import constants

        endpoint = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=3).close()
            reachable = True
        except OSError:
            reachable = False
        os.environ["HF_HUB_OFFLINE"] = "0" if reachable else "1"
        if not reachable:
            print("[evaluate] the Hugging Face Hub is unreachable: running offline (HF_HUB_OFFLINE=1)",
                  file=sys.stderr, flush=True)
    offline = os.environ["HF_HUB_OFFLINE"].strip().lower() not in ("0", "false", "no", "")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1" if offline else "0")
    return offline


def _hub_dataset(entry) -> str | None:
    """The hub repository a harness task reads its data from, or None (local files, or a group)."""
    config = getattr(entry, "cfg", None) or {}
    path = config.get("dataset_path")
    if not isinstance(path, str) or path in LOCAL_BUILDERS or Path(path).exists():
        return None
    return path


def in_local_cache(repo: str) -> bool:
    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", Path(constants.HF_HOME) / "datasets"))
    return hub.is_dir() or (datasets_cache / repo.replace("/", "___")).is_dir()


@functools.lru_cache(maxsize=1)
def _builtin_task_index() -> dict:
    """The harness's own task index (every YAML under lm_eval/tasks: seconds to build), once per process."""
    import lm_eval.tasks
    from lm_eval.tasks._index import TaskIndex  # the index TaskManager builds; public only through it

    return TaskIndex.build([Path(lm_eval.tasks.__file__).parent])


def task_manager(include: list[str], names: list[str] = ()):
    """A TaskManager over the harness's tasks plus the task YAML directories `include` (later ones win,
    as in lm-eval). The built-in index is built once per process and shared by every call, and not
    at all where the directories hold every task of `names`."""
    try:
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._index import TaskIndex
    except ImportError as err:
        raise EvaluationError(f"lm-eval is not installed ({err}): {INSTALL_HINT}") from None
    manager = TaskManager(include_path=None, include_defaults=False)
    own = TaskIndex.build([Path(p) for p in include])
    builtin = {} if names and all(name in own for name in names) else _builtin_task_index()
    # TaskManager exposes its index as this dict (its `load` resolves names through it).
    manager.task_index.update({**builtin, **own})
    return manager


def export_for_harness(checkpoint: Path, out: Path, tokenizer: str | None = None) -> Path:
    """The checkpoint's language model as an HF directory under `out` (reused when already there)."""
    step_dir, _ = resolve_native_checkpoint(Path(checkpoint))
    export = out / f"hf_{step_dir.name}"
    if not (export / "config.json").exists():
        try:
            native_to_hf(step_dir, export, layout="lm", tokenizer=tokenizer, weights=merged_if_adapters(step_dir))
        except (ConversionError, ConfigError) as err:  # a damaged checkpoint, a missing base: no half export
            shutil.rmtree(export, ignore_errors=True)
            raise EvaluationError(str(err)) from None
    return export


def merged_if_adapters(step_dir: Path):
    """An adapter run's checkpoint holds no model: its base with the adapters merged, in memory
    (`train.engines.assembly.merged_adapter_weights`); None for a checkpoint that holds its model."""
    if not read_marker(step_dir).get("adapters"):
        return None
    from train.engines.assembly import merged_adapter_weights

    return merged_adapter_weights(step_dir, log=lambda message: print(message, file=sys.stderr))


def run_harness(export: Path, tasks: list[str], out_file: Path, limit: int | None = None, batch_size: int = 1,
                device: str = "cpu", dtype: str = "float32", chat_template: bool = False) -> dict:
    """Run the harness on `export`; writes its results JSON to `out_file` and returns it."""
    try:
        import lm_eval
    except ImportError as err:
        raise EvaluationError(f"lm-eval is not installed ({err}): {INSTALL_HINT}") from None
    names, include = resolve_tasks(tasks)
    offline = set_offline_mode()
    manager = task_manager(include, names)
    unknown = [n for n in names if n not in manager.task_index]
    if unknown:
        raise EvaluationError(f"unknown lm-eval tasks {unknown}: give a harness task name or a task YAML path")
    skipped = {}
    if offline:
        for name in names:
            repo = _hub_dataset(manager.task_index.get(name))
            if repo and not in_local_cache(repo):
                skipped[name] = (f"its data ({repo}) is on the Hugging Face Hub, not in the local cache, and this "
                                 "machine is offline (HF_HUB_OFFLINE=1): download it where there is network, or "
                                 "point the task's dataset_path at a local copy")
                print(f"[evaluate] skipping {name}: {skipped[name]}", file=sys.stderr, flush=True)
        names = [n for n in names if n not in skipped]
        if not names:
            raise EvaluationError(f"no task can run offline: {', '.join(skipped)} need the Hugging Face Hub")
    if device == "cpu":
        # transformers says once per op that the Mamba kernels are absent: true and expected on CPU
        # (they are CUDA kernels); on a GPU the same line is worth acting on, so it stays there.
        logging.getLogger("transformers.integrations.hub_kernels").setLevel(logging.ERROR)
    results = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(export), "dtype": dtype, "trust_remote_code": False},
        tasks=names, limit=limit, batch_size=batch_size, device=device, task_manager=manager,
        apply_chat_template=chat_template, log_samples=False)
    if results is None:  # non-zero ranks of a distributed harness run
        return {}
    report = {key: results[key] for key in ("results", "versions", "n-shot", "configs", "higher_is_better")
              if key in results}
    report["model"] = str(export)
    if skipped:
        report["skipped"] = skipped
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def evaluate_checkpoint(checkpoint: Path, tasks: list[str], out: Path, tokenizer: str | None = None,
                        **harness_options) -> tuple[Path, dict]:
    """Export `checkpoint` under `out` and run the harness on it; returns (results file, results)."""
    step_dir, _ = resolve_native_checkpoint(Path(checkpoint))
    out_file = out / f"lm_eval_{step_dir.name}.json"
    return out_file, run_harness(export_for_harness(step_dir, out, tokenizer), tasks, out_file, **harness_options)
