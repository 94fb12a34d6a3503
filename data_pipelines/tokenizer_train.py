"""Train the small byte-level BPE tokenizer used by the smoke runs and the tests.

The real recipe uses the released Nemotron tokenizer; for CPU runs we need a real tokenizer
that is small (the embedding table dominates a tiny model), loads offline through
`transformers.AutoTokenizer`, and shares the special-token ids of `special_tokens`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipelines.training.special_tokens import (
    ALL_SPECIAL_TOKENS,
    BOS,
    EOS,
    IM_END,
    IM_START,
    MIN_TRAINED_VOCAB_SIZE,
    PAD,
    REASONING_OFF,
    THINK_CLOSE,
    THINK_OPEN,
    UNK,
)

# Large enough for stage 4 (~300K tokens) so transformers never warns about truncation.
MODEL_MAX_LENGTH = 1 << 20

# ChatML, as in the released Nemotron Nano V2 tokenizer: one block per message, and the
# generation prompt opens an assistant block. As in the released template, a `/no_think` system
# prompt opens that block with an empty think (training writes it at the start of every answer),
# so `apply_chat_template(..., add_generation_prompt=True)` prompts the way training did.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '" + IM_START + "' + message['role'] + '\\n' + message['content']"
    " + '" + IM_END + "\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + IM_START + "assistant\\n' -}}"
    "{%- if messages and messages[0]['role'] == 'system' and '" + REASONING_OFF + "' in messages[0]['content'] -%}"
    "{{- '" + THINK_OPEN + THINK_CLOSE + "' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_SPECIAL_TOKEN_PATTERN = re.compile("|".join(re.escape(t) for t in ALL_SPECIAL_TOKENS))


def _without_special_tokens(texts: Iterable[str]) -> Iterator[str]:
    """Drop special-token strings so no merges are spent on them: they get their own ids."""
    for text in texts:
        yield _SPECIAL_TOKEN_PATTERN.sub(" ", text)


def _build_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the alphabet, so no input ever needs `<unk>`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # The trainer assigns ids 0..N-1 to these in order, which the model relies on.
        special_tokens=list(ALL_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_without_special_tokens(texts), trainer=trainer)
    return tokenizer


def _tokenizer_config() -> dict:
    """The `tokenizer_config.json` that lets AutoTokenizer load the directory offline."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [
            t for t in ALL_SPECIAL_TOKENS if t not in (BOS, EOS, PAD, UNK)
        ],
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 1024) -> Path:
    """Train on `texts` and save a transformers-loadable tokenizer into `out_dir`.

    Returns `out_dir`. `vocab_size` counts the special tokens and the 256 byte symbols.
    """
    if vocab_size < MIN_TRAINED_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too small: set it to at least {MIN_TRAINED_VOCAB_SIZE}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_bpe_tokenizer(texts, vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config_text = json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False) + "\n"
    (out_dir / "tokenizer_config.json").write_text(config_text, encoding="utf-8")
    return out_dir
