"""Small CLIP models and tokenizers built from scratch, for tests, demos and the toy world.

No pretrained CLIP can be downloaded on our machines, so these builders make a real ``CLIPModel`` and a
real byte-level BPE ``CLIPTokenizer`` (CLIP's normaliser, pre-tokeniser and ``</w>`` suffix) that are
saved with ``save_pretrained`` and read back through the same ``from_pretrained`` path as OpenAI weights.
Likewise a real ``SiglipModel`` with a sentencepiece ``SiglipTokenizer`` trained offline.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokeniser pattern (transformers' CLIPTokenizer uses the same one).
_CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """Train a CLIP-compatible BPE tokenizer on ``texts``.

    The vocabulary is laid out as CLIP's: BOS=0, EOS=1 (EOS doubles as pad, as in OpenAI checkpoints),
    the 256 byte characters, their word-final ``</w>`` forms, then one entry per merge. Every byte has a
    token, so no input maps to the unknown token (which is EOS and would corrupt EOT pooling).
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=EOS))
    bpe.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    merges = [
        tuple(m) if isinstance(m, list) else tuple(m.split(" "))
        for m in json.loads(bpe.to_str())["model"]["merges"]
    ]
    vocab: dict[str, int] = {}
    for tok in [BOS, EOS, *alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges)]:
        vocab.setdefault(tok, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges)


def _apply_overrides(overrides: dict, text: dict, vision: dict) -> dict:
    """Write ``text_*`` / ``vision_*`` keys into the tower dicts; return the other (top-level) keys."""
    rest = {}
    for key, value in overrides.items():
        if key.startswith("text_"):
            text[key[5:]] = value
        elif key.startswith("vision_"):
            vision[key[7:]] = value
        else:
            rest[key] = value
    return rest


def tiny_clip_config(vocab_size: int, **overrides):
    """A small ``CLIPConfig``; ``text_*``/``vision_*``/top-level keys in ``overrides`` replace the
    defaults."""
    from transformers import CLIPConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=1,  # must be the real EOS id so HF pools at the first EOS (pad == eos)
        pad_token_id=1,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    top = {"projection_dim": 32, **_apply_overrides(overrides, text, vision)}  # overrides win
    return CLIPConfig(text_config=text, vision_config=vision, **top)


def save_random_clip(
    path: str | os.PathLike, texts: Iterable[str], seed: int = 0, vocab_size: int = 1000, **config_overrides
):
    """Build a randomly initialised CLIP + tokenizer trained on ``texts`` and save both to ``path``
    atomically."""
    from transformers import CLIPModel

    from dbtr.utils.io import atomic_directory

    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(len(tokenizer), **config_overrides)).eval()
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------- SigLIP
def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """A real ``SiglipTokenizer`` on a sentencepiece unigram model trained on ``texts``.

    The ids follow SigLIP's (T5's) layout: ``<pad>`` = 0, ``</s>`` = 1 (EOS, and the pad the tokenizer uses,
    as in google/siglip-*), ``<unk>`` = 2, no BOS. The corpus is canonicalised the way the tokenizer
    canonicalises its input (lower case, no punctuation), so the pieces are the ones it will look up.
    """
    import io
    import tempfile
    from pathlib import Path

    import sentencepiece as spm
    from transformers import SiglipTokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([_canonical(t) for t in texts]),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus has fewer pieces; take what it has
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # the tokenizer keeps the loaded model; save_pretrained writes it
        path = Path(tmp) / "spiece.model"
        path.write_bytes(model.getvalue())
        return SiglipTokenizer(vocab_file=str(path))


def _canonical(text: str) -> str:
    """What ``SiglipTokenizer.canonicalize_text`` makes of ``text`` (lower case, no punctuation, single
    spaces): the training corpus then holds the strings the tokenizer will look up."""
    import re
    import string

    return re.sub(r"\s+", " ", text.lower().translate(str.maketrans("", "", string.punctuation))).strip()


def tiny_siglip_config(vocab_size: int, **overrides):
    """A small ``SiglipConfig``; ``text_*``/``vision_*`` keys in ``overrides`` replace the defaults. The text
    length is SigLIP's 64, so the tiny model pads and pools exactly as google/siglip-* do."""
    from transformers import SiglipConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=1,
        eos_token_id=1,
        bos_token_id=None,  # SigLIP's tokenizer has none
        projection_size=48,
    )
    vision = dict(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    rest = _apply_overrides(overrides, text, vision)
    if rest:
        raise TypeError(f"unknown SigLIP config override {next(iter(rest))!r} (use text_* or vision_*)")
    return SiglipConfig(text_config=text, vision_config=vision)


def save_random_siglip(
    path: str | os.PathLike, texts: Iterable[str], seed: int = 0, vocab_size: int = 1000, **config_overrides
):
    """A randomly initialised ``SiglipModel`` + sentencepiece ``SiglipTokenizer`` trained on ``texts``, both
    saved to ``path`` atomically (read back through the same ``from_pretrained`` path as google/siglip-*)."""
    from transformers import SiglipModel

    from dbtr.utils.io import atomic_directory

    tokenizer = train_sentencepiece_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = SiglipModel(tiny_siglip_config(len(tokenizer), **config_overrides)).eval()
    with torch.no_grad():  # SigLIP's trained init: log(10) and -10 (HF's random init draws them)
        model.logit_scale.fill_(2.302585)
        model.logit_bias.fill_(-10.0)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model, tokenizer
