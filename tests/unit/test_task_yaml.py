"""`train.evaluate --tasks FILE.yaml`: a task YAML is read for its name, past lm-eval's `!function`
tags; a broken one is one line naming the file and the line."""

from __future__ import annotations

import pytest

from train.evaluate.harness import EvaluationError, resolve_tasks


def test_task_yaml_with_function_tags_gives_its_name(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("task: my_task\ndataset_path: json\nprocess_docs: !function utils.process_docs\n"
                    "metric_list:\n  - metric: exact_match\n")
    assert resolve_tasks([str(path), "arc_easy"]) == (["my_task", "arc_easy"], [str(tmp_path.resolve())])


def test_broken_task_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: mine\nmetric_list:\n  - metric: [exact_match\n  - other: 1\n")
    with pytest.raises(EvaluationError, match=rf"task file {path} is not valid YAML at line \d+, column \d+: "):
        resolve_tasks([str(path)])
    path.write_text("- just\n- a list\n")
    with pytest.raises(EvaluationError, match="holds no mapping"):
        resolve_tasks([str(path)])
