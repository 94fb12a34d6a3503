"""`python -m train.evaluate --ckpt RUN_OR_CHECKPOINT [--tasks T ...] [--vlm-tasks T ... [--data-dir DIR]]
[--generation [NAME=PATH ...]]`

--tasks: EleutherAI lm-eval task names or task YAML paths, run by the harness's `hf` model on the
checkpoint's language model exported as transformers loads it (tokenizer and chat template
included). --vlm-tasks: vision-language lm-eval tasks (chartqa, mmmu_val, docvqa_val, ...) as the
harness defines them, on the vision-language model prompted as training prompts (model `hybrid-vl`),
data read from DIR/<hub repo id> with --data-dir (offline clusters). --generation: the vision-language model's answers on held-out shards (the run's
data.val_sources, or NAME=PATH pairs), scored by exact and relaxed match, with cached greedy
generation. Results go to <run dir>/eval/ as JSON (one file per kind and checkpoint step).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_pipelines.training.config import SourceConfig
from train.checkpoint.files import resolve_native_checkpoint
from train.evaluate.harness import EvaluationError
from train.hf.errors import ConversionError


def parse_source(text: str) -> SourceConfig:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return SourceConfig(name=name, path=path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, or a step dir")
    parser.add_argument("--tasks", nargs="+", default=[], help="lm-eval task names or task YAML paths")
    parser.add_argument("--vlm-tasks", nargs="+", default=[],
                        help="vision-language lm-eval tasks or groups (chartqa, mmmu_val, docvqa_val) or task YAML paths")
    parser.add_argument("--data-dir", default=None,
                        help="vlm tasks: directory holding local copies of the tasks' Hub datasets at DIR/<repo id>")
    parser.add_argument("--think", action="store_true", help="vlm tasks: reasoning mode on (/think; default /no_think)")
    parser.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many documents per task")
    parser.add_argument("--batch-size", type=int, default=1,
                        help="lm-eval batch size (default 1); vlm tasks: prompts decoded together")
    parser.add_argument("--device", default="cpu", help="lm-eval device, e.g. cuda:0 (default cpu)")
    parser.add_argument("--dtype", default="float32", help="lm-eval model dtype (default float32)")
    parser.add_argument("--generation", nargs="*", type=parse_source, default=None, metavar="NAME=PATH",
                        help="score generated answers on held-out shards (no value: the run's data.val_sources)")
    parser.add_argument("--samples", type=int, default=32, help="generation: samples per source (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length cap (generation: default 64; vlm tasks: default each task's own)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the run's data.tokenizer)")
    parser.add_argument("--out", default=None, help="results directory (default: <run dir>/eval)")
    return parser


def evaluate(args: argparse.Namespace) -> dict:
    step_dir, run_dir = resolve_native_checkpoint(Path(args.ckpt))
    out = Path(args.out) if args.out else run_dir / "eval"
    results: dict = {"checkpoint": str(step_dir)}
    if args.tasks:
        from train.evaluate.harness import evaluate_checkpoint

        out_file, report = evaluate_checkpoint(step_dir, args.tasks, out, args.tokenizer, limit=args.limit,
                                               batch_size=args.batch_size, device=args.device, dtype=args.dtype)
        results["lm_eval"] = {"file": str(out_file), "results": report.get("results", {}),
                              "skipped": report.get("skipped", {})}
    if args.vlm_tasks:
        from train.evaluate.vlm_harness import evaluate_checkpoint_vlm

        out_file, report = evaluate_checkpoint_vlm(step_dir, args.vlm_tasks, out, args.tokenizer, data_dir=args.data_dir,
                                                   limit=args.limit, batch_size=args.batch_size, think=args.think,
                                                   max_gen_toks=args.max_new_tokens, device=args.device)
        results["vlm_eval"] = {"file": str(out_file), "results": report.get("results", {}), "think": args.think}
    if args.generation is not None:
        from train.evaluate.generation import score_source
        from train.chat.session import load_chat_model

        chat = load_chat_model(step_dir, args.tokenizer)
        sources = args.generation or chat.cfg.data.val_sources
        if not sources:
            raise EvaluationError(f"{run_dir} has no data.val_sources: name the shards, --generation NAME=PATH")
        scores = {}
        for source in sources:
            print(f"[evaluate] generating on {source.name} ({args.samples} samples)", file=sys.stderr, flush=True)
            scores[source.name] = score_source(chat, source, args.samples, args.max_new_tokens or 64).as_dict()
        out_file = out / f"generation_{step_dir.name}.json"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(scores, indent=2) + "\n")
        results["generation"] = {"file": str(out_file), "results": scores}
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if not args.tasks and not args.vlm_tasks and args.generation is None:
        print("evaluate error: nothing to run: give --tasks, --vlm-tasks and/or --generation", file=sys.stderr)
        return 2
    try:
        results = evaluate(args)
    except (EvaluationError, ConversionError, FileNotFoundError, KeyError, OSError, NotImplementedError) as err:
        print(f"evaluate error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
