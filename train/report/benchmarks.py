"""Benchmark scores of a stage run, read from its summary.json: the lm-eval tasks on the language
model ("lm_eval") and the vision-language tasks on the VLM ("vlm_eval"), one (kind, task, metric)
row each, and the pipeline's table of benchmark by stage (what each stage bought and cost)."""

from __future__ import annotations

KINDS = {"vlm_eval": "vlm", "lm_eval": "lm-eval"}


def stage_scores(summary: dict) -> dict[str, float]:
    """{"<kind> <task> <metric>": score} of one stage (stderr and non-numbers left out; the harness's
    ",none" filter suffix dropped, other filters kept)."""
    scores = {}
    for key, kind in KINDS.items():
        for task, metrics in ((summary or {}).get(key) or {}).get("results", {}).items():
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name \
                        and name not in ("sample_len",):
                    metric = name.removesuffix(",none")
                    scores[f"{kind} {task} {metric}"] = float(value)
    return scores


def benchmark_table(stages: list[tuple[str, dict]]) -> tuple[list[str], dict[str, list[float | None]]]:
    """(stage names, {benchmark row: [score per stage, None where the stage did not run it]}) from
    (stage name, summary) pairs in pipeline order."""
    names = [name for name, _ in stages]
    per_stage = [stage_scores(summary) for _, summary in stages]
    rows = sorted({row for scores in per_stage for row in scores})
    return names, {row: [scores.get(row) for scores in per_stage] for row in rows}
