"""Special tokens shared by the tokenizer trainer, the chat template and the model.

The chat format is ChatML-like (as the released Nemotron Nano V2 tokenizer uses
`<|im_start|>role ... <|im_end|>`); media are written as `<img>` + N context tokens + `</img>`.
"""

BOS = "<s>"
EOS = "</s>"
PAD = "<pad>"
UNK = "<unk>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
IMG_START = "<img>"
IMG_END = "</img>"
# The token repeated once per visual embedding; the model splices projector outputs here.
IMG_CONTEXT = "<image>"
# Placeholder that marks a video in user content; expanded into per-frame image blocks.
VIDEO_PLACEHOLDER = "<video>"
# Placeholder that marks an image in user content (same string as the context token: the
# template replaces each placeholder before tokenizing, so the two never collide).
IMAGE_PLACEHOLDER = "<image>"

# Order fixes the ids 0..N-1 in every tokenizer we train.
ALL_SPECIAL_TOKENS = [
    UNK, BOS, EOS, PAD,
    IM_START, IM_END,
    THINK_OPEN, THINK_CLOSE,
    IMG_START, IMG_END, IMG_CONTEXT, VIDEO_PLACEHOLDER,
]

REASONING_ON = "/think"
REASONING_OFF = "/no_think"

# The smallest vocabulary a byte-level BPE tokenizer with these special tokens can have: every one of
# the 256 bytes is a symbol of its own (the smoke tokenizer is trained to model.language_model.vocab_size).
MIN_TRAINED_VOCAB_SIZE = len(ALL_SPECIAL_TOKENS) + 256
