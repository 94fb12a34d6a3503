"""`python -m train.chat --ckpt DIR [--image F]... [--video F]... --prompt TEXT [--think]`: greedy chat.

Loads a run's `config.yaml` and model weights (`--ckpt` is a run dir, its `checkpoints/` dir or a
`step_N` dir), renders the prompt exactly as training renders a conversation (chat template,
image tiling, video frame sampling and frame labels, `/think` or `/no_think` in the system prompt
and, with reasoning off, the empty `<think></think>` that opens every trained answer), then
greedy-decodes with the model's Mamba and attention caches (`train.chat.generate`), writing text to stdout as
it comes. Timing goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from data_pipelines.training import special_tokens as st
from data_pipelines.training.decode import MediaDecodeError
from train.chat.session import TextStream, build_prompt, load_chat_model
from train.chat.generate import greedy_tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="run dir, its checkpoints/ dir, or a step_N dir")
    parser.add_argument("--prompt", required=True, help="the user's message")
    parser.add_argument("--image", action="append", default=[], type=Path, help="an image file (repeatable)")
    parser.add_argument("--video", action="append", default=[], type=Path, help="a video file (repeatable)")
    parser.add_argument("--think", action="store_true", help="reasoning mode (/think); default /no_think")
    parser.add_argument("--system", default="", help="system prompt (the reasoning marker is added to it)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--tokenizer", help="tokenizer dir (default: data.tokenizer of the run's config)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        chat = load_chat_model(args.ckpt, args.tokenizer, device)
        ids, tiles = build_prompt(args.prompt, [p.read_bytes() for p in args.image],
                                  [p.read_bytes() for p in args.video], args.think, args.system, chat.cfg,
                                  chat.tokenizer)
    except (OSError, MediaDecodeError, ValueError) as err:  # ValueError includes config errors
        print(f"chat error: {err}", file=sys.stderr)
        return 2

    special = chat.tokenizer.special_ids
    stop_ids = {special[st.IM_END], special[st.EOS]}
    stream = TextStream(chat.tokenizer)
    started = time.perf_counter()
    with torch.no_grad():
        embeds = chat.model.embed_inputs(torch.tensor([ids], device=device), tiles.to(device))
    count, first_at, last_at = 0, None, started
    for token in greedy_tokens(chat.model.language_model, embeds, args.max_new_tokens, stop_ids):
        count, last_at = count + 1, time.perf_counter()
        first_at = first_at or last_at
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()

    total = last_at - started
    rate = f"{count / total:.1f} tokens/s" if count else "no tokens"
    decode = f", decode {(count - 1) / (last_at - first_at):.1f} tokens/s" if count > 1 else ""
    prefill = f"prefill {first_at - started:.2f}s" if first_at else "stopped at once"
    print(f"[chat] prompt {len(ids)} tokens ({tiles.shape[0]} tiles), {prefill}; {count} new tokens in {total:.2f}s "
          f"= {rate}{decode}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
