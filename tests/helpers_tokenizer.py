"""A tiny character-level tokenizer built in code, so tests never need the hub.

Its vocabulary (4 specials + printable ASCII + newline = 100 ids) fits the tiny test models'
vocab of 128. Any text tokenizes: characters outside the vocabulary map to <unk>.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= 128
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # one token per character (newlines included), concatenated back without spaces on decode
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.model_max_length = 256  # the tiny models' max_position_embeddings
    return tok
