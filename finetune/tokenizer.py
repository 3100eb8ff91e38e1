"""Tokenizers: load the model's own, or train a tiny byte-level BPE for an inline architecture.

The trained tokenizer is GPT-2 style byte-level BPE (the ``tokenizers`` library), so it encodes *any* text: every
byte is in the initial alphabet, so nothing maps to an unknown token and ``decode(encode(s)) == s``. Training is
deterministic (same texts and vocab size give the same vocabulary and ids), which keeps tiny offline runs and their
resumes reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .errors import SlimtuneError, first_line
from .paths import is_local_model
from .recipe import ModelConfig

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2 in a trained tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic; encodes any text through byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                         f"{len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def load_tokenizer(cfg: ModelConfig, texts: Callable[[], Iterable[str]] | None) -> PreTrainedTokenizerFast:
    """The recipe's tokenizer: ``model.tokenizer``, else the model's own (``model.name_or_path``), else (inline
    architecture, no tokenizer given) one trained on ``texts()``.

    A tokenizer without a pad token gets ``pad = eos`` (Llama 2/3 ship none). That is safe for training because
    padded positions are masked out of the loss and the attention mask, so the pad id is never learned as "stop".
    """
    if cfg.tokenizer is not None or cfg.name_or_path is not None:
        key, source = ("model.tokenizer", cfg.tokenizer) if cfg.tokenizer else ("model.name_or_path",
                                                                                 cfg.name_or_path)
        tokenizer = _from_pretrained(key, source, cfg)
    else:
        if texts is None:
            raise SlimtuneError("model.architecture with model.tokenizer null trains a tokenizer on the training "
                                "texts, but none were given; set model.tokenizer to a tokenizer hub id or directory")
        tokenizer = train_tokenizer(texts(), cfg.tokenizer_vocab_size)
    return ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token (its eos) if it has none."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise SlimtuneError("the tokenizer has neither a pad nor an eos token, so batches cannot be padded; use "
                                "a causal-LM tokenizer (model.tokenizer) that defines an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _from_pretrained(key: str, source: str, cfg: ModelConfig):
    if is_local_model(source) and not Path(source).expanduser().is_dir():
        raise SlimtuneError(f"{key}: local directory {source} does not exist (give a directory with tokenizer files, "
                            "or a hub id such as meta-llama/Meta-Llama-3-8B)")
    kwargs = {}
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if source == cfg.name_or_path and cfg.revision:  # model.revision pins the model repo, not a separate tokenizer
        kwargs["revision"] = cfg.revision
    try:
        return AutoTokenizer.from_pretrained(str(Path(source).expanduser()) if is_local_model(source) else source,
                                             **kwargs)
    except (OSError, ValueError) as exc:
        raise SlimtuneError(f"{key}: cannot load a tokenizer from {source!r} ({first_line(exc)}); give a local "
                            "directory with tokenizer files or a hub id that is cached or reachable") from None

