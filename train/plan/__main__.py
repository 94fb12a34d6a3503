"""`python -m train.plan --config-name <recipe> [overrides] [--out DIR]`: size a recipe before running it.

Builds the recipe's model on the meta device (no memory, no data, no GPU) and writes `plan.json`
(to `--out`, else `run.dir`) = `{"params": {language_model, vision_model, projector, total,
trainable}, "memory_gib": {weights, gradients, optimizer, activations, total}, "activations_gib":
{...per part and layer kind...}, "assumptions": {...}}` and prints it as a table. Data paths are
never looked at (only `model.*`, `trainable.*`, `precision.*` and sizes are validated), so a real
recipe plans on a machine without its data.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train.config.compose import list_recipes
from train.config.schema import ConfigError
from train.plan import estimate

USAGE = (
    "usage: python -m train.plan --config-name <recipe> [--out DIR] [overrides...]\n"
    f"recipes: {', '.join(list_recipes())}"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.plan", usage=USAGE, description=f"{__doc__}\n{estimate.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-name", "-cn", required=True)
    parser.add_argument("--out", default=None, help="directory for plan.json (default: the recipe's run.dir)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="GPUs the run uses (default: one replica, tensor x context x pipeline)")
    parser.add_argument("--measure", action="store_true",
                        help="also run a few training steps on this device (one process, native engine) and print "
                             "step time, tokens/s and peak memory beside the estimate (plan.json: measured)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.seq_length=49152")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = estimate.load_plan_config(args.config_name, args.overrides)
        plan = estimate.make_plan(cfg, args.config_name, args.world_size)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out or cfg.run.dir)
    out.mkdir(parents=True, exist_ok=True)
    print(estimate.format_plan(plan))
    if args.measure:
        from train.plan.measure import format_measured, measure

        plan["measured"] = measure(cfg)
        print(format_measured(plan["measured"], plan["memory_gib"]["total"]))
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(f"wrote {out / 'plan.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
