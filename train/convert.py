"""`python -m train.convert hf-to-native|native-to-hf|compose ...`: checkpoint conversion.

hf-to-native: a transformers `nemotron_h` (LM) or `nemotron_h_omni` (VL) directory -> a native run
directory (config.yaml + checkpoints/step_0000000), usable as `init.from_checkpoint=DST/checkpoints/step_0000000`
and by `train.api.load_language_model(DST)`.
native-to-hf: a run dir, its checkpoints/ dir or a step dir -> an HF directory with the tokenizer,
generation config and (vl) processor files, so transformers serves it as it is; `--layout lm`
(default) loads with `AutoModelForCausalLM.from_pretrained`, `--layout vl` writes the omni layout.
compose: an HF Nemotron-H LM dir + an HF RADIO dir (+ a seeded fresh projector) -> a native run
directory to start Stage 0 from (`init.from_checkpoint=DST/checkpoints/step_0000000`).
Offline, no remote code. See train/hf/mapping.py for the name mapping.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from train.config.schema import ConfigError
from train.hf.compose import compose
from train.hf.conversion import hf_to_native, native_to_hf
from train.hf.errors import ConversionError
from train.hf.files import DEFAULT_MAX_SHARD_BYTES

DTYPES = {"keep": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1048576' -> bytes (decimal and binary units, as HF's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: use e.g. 5GB, 500MB, 2GiB or a byte count")
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_native = sub.add_parser("hf-to-native", help="transformers directory -> native run directory")
    to_native.add_argument("--src", required=True, help="HF directory with config.json and safetensors")
    to_native.add_argument("--dst", required=True, help="new (or empty) run directory")
    to_hf = sub.add_parser("native-to-hf", help="native run/checkpoint directory -> transformers directory")
    to_hf.add_argument("--src", required=True, help="run dir, its checkpoints/ dir, or a step_N dir")
    to_hf.add_argument("--dst", required=True, help="new (or empty) HF directory")
    to_hf.add_argument("--layout", choices=["lm", "vl"], default="lm",
                       help="lm: NemotronHForCausalLM (default); vl: nemotron_h_omni with the RADIO ViT")
    to_hf.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast floating tensors (default: keep)")
    to_hf.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                       help="largest safetensors shard, e.g. 5GB (default 5GiB)")
    to_hf.add_argument("--tokenizer", default=None,
                       help="tokenizer directory to export with the weights (default: the run's data.tokenizer)")
    to_hf.add_argument("--weights-only", action="store_true",
                       help="write weights and config.json only (no tokenizer, generation or processor config)")
    adapters = to_hf.add_mutually_exclusive_group()
    adapters.add_argument("--adapters", action="store_true",
                          help="a peft=lora|dora run: DST gets the base (with the parts that trained whole) and "
                               "DST/adapter/ a PEFT adapter directory (PeftModel.from_pretrained, vLLM --enable-lora)")
    adapters.add_argument("--merge", action="store_true",
                          help="a peft=lora|dora run: the adapters merged into the base, as full weights")
    to_hf.add_argument("--base", default=None,
                       help="with --adapters/--merge: the base the adapters trained on, if not the run's "
                            "init.from_checkpoint (checked against the fingerprint the checkpoint recorded)")
    to_hf.add_argument("--image-token-id", type=int, default=None,
                       help="vl layout: image_token_id for config.json (default: the source's, if any)")
    composed = sub.add_parser("compose", help="HF language model + HF RADIO vision encoder -> native Stage 0 start")
    composed.add_argument("--lm", required=True, help="transformers nemotron_h directory (NemotronHForCausalLM)")
    composed.add_argument("--vision", required=True, help="transformers RADIO directory (RadioModel.save_pretrained)")
    composed.add_argument("--dst", required=True, help="new (or empty) run directory")
    composed.add_argument("--seed", type=int, default=0, help="seed of the fresh projector (default 0)")
    composed.add_argument("--projector-hidden-size", type=int, default=None,
                          help="projector MLP width (default: 4x the LM hidden size, as the released 12B)")
    composed.add_argument("--downsample-ratio", type=float, default=0.5, help="pixel-shuffle ratio (default 0.5)")
    composed.add_argument("--image-size", type=int, default=None,
                          help="tile size in pixels (default: the RADIO config's image_size)")
    return parser


def export_adapter_run(args: argparse.Namespace) -> dict:
    """`native-to-hf --merge | --adapters` of a peft run: its base rebuilt and checked, adapters loaded."""
    from train.engines.assembly import load_adapted_model
    from train.engines.native.adapters import adapter_state, unload_adapters
    from train.hf.peft_adapter import write_peft_adapter

    cfg, model, run_dir = load_adapted_model(Path(args.src), args.base, log=lambda m: print(m, file=sys.stderr))
    modules = [name for name, module in model.named_modules() if hasattr(module, "lora_A")]
    peft_state = adapter_state(model) if args.adapters else None
    state = unload_adapters(model, merge=args.merge).state_dict()
    summary = native_to_hf(args.src, args.dst, layout=args.layout, dtype=DTYPES[args.dtype],
                           max_shard_bytes=args.max_shard_size, image_token_id=args.image_token_id,
                           tokenizer=args.tokenizer, weights_only=args.weights_only, weights=(cfg, state, run_dir))
    if peft_state is not None:
        summary["adapter"] = write_peft_adapter(Path(args.dst) / "adapter", peft_state, modules, cfg.peft, args.layout,
                                                base_model=str(Path(args.dst).resolve()), dtype=DTYPES[args.dtype])
    summary["merged" if args.merge else "base"] = True
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "hf-to-native":
            summary = hf_to_native(args.src, args.dst)
            if summary["carried"]:
                print(f"note: {len(summary['carried'])} tensors have no counterpart in our model; carried unchanged "
                      f"in {args.dst}/hf_source/extra.safetensors and restored on export: "
                      f"{', '.join(summary['carried'][:6])}{' ...' if len(summary['carried']) > 6 else ''}",
                      file=sys.stderr)
        elif args.command == "compose":
            summary = compose(args.lm, args.vision, args.dst, seed=args.seed,
                              projector_hidden_size=args.projector_hidden_size,
                              downsample_ratio=args.downsample_ratio, image_size=args.image_size)
        elif args.adapters or args.merge:
            summary = export_adapter_run(args)
        else:
            summary = native_to_hf(args.src, args.dst, layout=args.layout, dtype=DTYPES[args.dtype],
                                   max_shard_bytes=args.max_shard_size, image_token_id=args.image_token_id,
                                   tokenizer=args.tokenizer, weights_only=args.weights_only)
    except (ConversionError, ConfigError, FileNotFoundError) as err:
        print(f"convert error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
