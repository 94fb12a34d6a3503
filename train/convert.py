"""`python -m train.convert hf-to-native|native-to-hf --src DIR --dst DIR`: checkpoint conversion.

hf-to-native: a transformers `nemotron_h` (LM) or `nemotron_h_omni` (VL) directory -> a native run
directory (config.yaml + checkpoints/step_0000000), usable as `init.from_checkpoint=DST/checkpoints/step_0000000`
and by `train.api.load_language_model(DST)`.
native-to-hf: a run dir, its checkpoints/ dir or a step dir -> an HF directory; `--layout lm`
(default) loads with `AutoModelForCausalLM.from_pretrained`, `--layout vl` writes the omni layout.
Offline, no remote code. See train/hf/conversion.py for the name mapping.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import torch

from train.hf.conversion import DEFAULT_MAX_SHARD_BYTES, ConversionError, hf_to_native, native_to_hf

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
    to_hf.add_argument("--image-token-id", type=int, default=None,
                       help="vl layout: image_token_id for config.json (default: the source's, if any)")
    return parser


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
        else:
            summary = native_to_hf(args.src, args.dst, layout=args.layout, dtype=DTYPES[args.dtype],
                                   max_shard_bytes=args.max_shard_size, image_token_id=args.image_token_id)
    except (ConversionError, FileNotFoundError) as err:
        print(f"convert error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
