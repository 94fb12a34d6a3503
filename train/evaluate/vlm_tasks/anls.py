"""ANLS, the DocVQA metric (Biten et al., "Scene Text Visual Question Answering", ICCV 2019): per
question, the best over its reference answers of 1 - edit distance / length of the longer string
(after lowercasing and collapsing whitespace), and 0 where that similarity is below 0.5.
Loaded by lm-eval from `docvqa_val.yaml` (`!function anls.process_results`)."""

from __future__ import annotations

THRESHOLD = 0.5


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _normal(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, references: list[str], threshold: float = THRESHOLD) -> float:
    best = 0.0
    pred = _normal(prediction)
    for reference in references:
        ref = _normal(reference)
        longest = max(len(pred), len(ref))
        similarity = 1.0 if longest == 0 else 1.0 - levenshtein(pred, ref) / longest
        best = max(best, similarity)
    return best if best >= threshold else 0.0


def process_results(doc: dict, results: list[str]) -> dict:
    return {"anls": anls(results[0], list(doc["answers"]))}
