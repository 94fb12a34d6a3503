"""Vision-language benchmarks through lm-eval: the harness's own task definitions (prompt, answer
extraction, metric) on this project's VLM (`vlm_model.HybridVLM`), data read from local copies.

Tasks: harness names (`chartqa`, `mmmu_val`, a subject such as `mmmu_val_art`), the tasks shipped
in `vlm_tasks/` (`docvqa_val`), or task YAML paths. A group runs all its tasks.

Local data (`data_dir`): a directory holding downloads of the tasks' Hub dataset repositories at
their repository ids, `DATA_DIR/HuggingFaceM4/ChartQA`, `DATA_DIR/MMMU/MMMU`,
`DATA_DIR/lmms-lab/DocVQA` (what `huggingface-cli download --repo-type dataset REPO --local-dir
DATA_DIR/REPO` writes). Each task's YAML is then run through an override file that `include`s the
harness's own YAML and changes one key, `dataset_path`, to the local directory (`datasets` reads
a local repository copy as it reads the Hub one: its README's configs and splits, parquet files,
the Image feature); the override carries the task's name, so groups pick it up. A task whose copy
is missing fails before the model loads, in one line that names the path looked for.
Without `data_dir` the tasks read the Hub (or, offline, the local `datasets` cache).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import yaml

from train.evaluate.harness import (
    EvaluationError,
    LOCAL_BUILDERS,
    in_local_cache,
    set_offline_mode,
    resolve_tasks,
    task_manager,
)

VLM_TASKS_DIR = Path(__file__).resolve().parent / "vlm_tasks"
OUTPUT_KEYS = ("results", "versions", "n-shot", "n-samples", "higher_is_better", "group_subtasks")
KEEP_EXAMPLES = 3  # predictions kept per task in the results file, for a look


def leaf_tasks(manager, name: str) -> list[str]:
    """The tasks a name runs: itself, or a group's members, recursively."""
    entry = manager.task_index.get(name)
    if entry is None:
        raise EvaluationError(f"unknown lm-eval task {name!r}: give a harness task or group name "
                              f"(e.g. chartqa, mmmu_val, docvqa_val) or a task YAML path")
    members = (entry.cfg or {}).get("task") if entry.kind.name == "GROUP" else None
    if members is None:
        return [name]
    if isinstance(members, (str, dict)):
        members = [members]
    leaves = []
    for member in members:
        member_name = member.get("task") if isinstance(member, dict) else member
        if not isinstance(member_name, str):
            raise EvaluationError(f"group {name} defines a task inline: run its tasks by name")
        leaves += leaf_tasks(manager, member_name)
    return leaves


def hub_cache_dir(repo: str) -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"


def local_data_overrides(manager, names: list[str], data_dir: Path | None, offline: bool, work: Path) -> list[str]:
    """Write an override YAML into `work` for every task whose Hub data has a copy under `data_dir`;
    returns the task names run. Raises, naming the path looked for, where a task's data is not
    present locally (with `data_dir`, or offline without it)."""
    for name in names:
        for leaf in leaf_tasks(manager, name):
            entry = manager.task_index[leaf]
            repo = (entry.cfg or {}).get("dataset_path")
            if not isinstance(repo, str) or repo in LOCAL_BUILDERS or Path(repo).exists():
                continue  # local files already (a builder with data_files, or a path)
            if data_dir is None:
                if offline and not in_local_cache(repo):
                    raise EvaluationError(
                        f"{leaf}: its data ({repo}) is not present locally: looked for {hub_cache_dir(repo)} "
                        f"(offline, no --data-dir); download the repository and pass --data-dir DIR holding DIR/{repo}")
                continue
            local = Path(data_dir) / repo
            if not local.is_dir():
                raise EvaluationError(
                    f"{leaf}: its data is not present locally: looked for {local} (download it with "
                    f"`huggingface-cli download --repo-type dataset {repo} --local-dir {local}`)")
            if entry.yaml_path is None:
                raise EvaluationError(f"{leaf} has no task YAML to override: run it where the Hub is reachable")
            override = {"include": str(Path(entry.yaml_path).resolve()), "task": leaf, "dataset_path": str(local.resolve())}
            (work / f"{leaf}.yaml").write_text(yaml.safe_dump(override, sort_keys=False))
    return names


def _examples(samples: dict | None) -> dict:
    """The first few (target, answer) pairs per task."""
    kept = {}
    for task, rows in (samples or {}).items():
        kept[task] = [{"target": row.get("target"), "answer": (row.get("filtered_resps") or [None])[0]}
                      for row in rows[:KEEP_EXAMPLES]]
    return kept


def prepare_tasks(tasks: list[str], data_dir: str | Path | None, work: Path):
    """(task names, a TaskManager that reads each task's data from its local copy). Fails here,
    before any model loads, where a task is unknown or its data is not present locally."""
    names, include = resolve_tasks(tasks)
    offline = set_offline_mode()
    data_dir = Path(data_dir) if data_dir else None
    if data_dir is not None and not data_dir.is_dir():
        raise EvaluationError(f"data directory {data_dir} does not exist: give the directory holding the dataset copies")
    manager = task_manager([str(VLM_TASKS_DIR), *include], names)
    local_data_overrides(manager, names, data_dir, offline, work)
    from lm_eval.tasks._index import TaskIndex

    manager.task_index.update(TaskIndex.build([work]))  # the overrides win over the tasks they include
    return names, manager


def run_vlm_harness(lm, names: list[str], manager, out_file: Path | None = None, limit: int | None = None,
                    data_dir: str | Path | None = None) -> dict:
    """Run the harness's tasks `names` (from `prepare_tasks`) on `lm` (an lm-eval LM: `HybridVLM`, or
    any multimodal model); writes the results JSON to `out_file` (when given) and returns it."""
    import lm_eval

    results = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, task_manager=manager,
                                      log_samples=True, apply_chat_template=False)
    if results is None:  # non-zero ranks of a distributed harness run
        return {}
    report = {key: results[key] for key in OUTPUT_KEYS if key in results}
    report["examples"] = _examples(results.get("samples"))
    report["think"] = bool(getattr(lm, "think", False))
    report["data_dir"] = str(data_dir) if data_dir else None
    if out_file is not None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def evaluate_checkpoint_vlm(checkpoint: Path, tasks: list[str], out: Path, tokenizer: str | None = None,
                            data_dir: str | Path | None = None, limit: int | None = None, batch_size: int = 1,
                            think: bool = False, max_gen_toks: int | None = None, device: str = "cpu",
                            chat=None) -> tuple[Path, dict]:
    """The VLM of `checkpoint` (or the loaded `chat` model) on `tasks`; results in
    out/vlm_eval_<step>[_think].json. Returns (results file, results)."""
    from train.checkpoint.files import resolve_native_checkpoint
    from train.evaluate.vlm_model import HybridVLM

    step_dir, _ = resolve_native_checkpoint(Path(checkpoint))
    out_file = Path(out) / f"vlm_eval_{step_dir.name}{'_think' if think else ''}.json"
    with tempfile.TemporaryDirectory(prefix="vlm_tasks_") as work:
        names, manager = prepare_tasks(tasks, data_dir, Path(work))
        options = {"think": think, "max_gen_toks": max_gen_toks, "batch_size": batch_size}
        lm = HybridVLM(chat=chat, **options) if chat is not None else \
            HybridVLM(pretrained=str(step_dir), tokenizer=tokenizer, device=device, **options)
        print(f"[evaluate] vision-language tasks {', '.join(tasks)} on {step_dir} "
              f"(reasoning {'on' if think else 'off'})", file=sys.stderr, flush=True)
        return out_file, run_vlm_harness(lm, names, manager, out_file, limit, data_dir)


