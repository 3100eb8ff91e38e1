"""Shared fixtures: a tiny byte-level BPE tokenizer and a tiny seeded Llama saved to a temp dir.

Everything is built in code, offline, in well under a second: 2 layers, hidden 64 (one NF4 block per row, so the
4-bit path is exercised for real), vocab 320. Session-scoped fixtures are read-only: copy before mutating.
"""

from __future__ import annotations

import os
from pathlib import Path

# No hub access in tests: fail fast instead of retrying a network that is not there. Must precede HF imports.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from slimtune.finetune.recipe import ArchitectureConfig, ModelConfig  # noqa: E402

TINY_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning a tiny model on a CPU is fast and deterministic.",
    "Instruction: add two numbers. Input: 2 and 3. Response: 5",
    "Instruction: name a colour. Response: blue",
    "Low-rank adapters train a small delta on top of a frozen base model.",
    "def add(a, b):\n    return a + b\n",
    "Quantized weights use four bits per value and a scale per block of 64.",
    "She sells sea shells by the sea shore; the shells she sells are sea shells.",
] * 4

TINY_VOCAB = 320


def tiny_architecture(**overrides) -> ArchitectureConfig:
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, tie_word_embeddings=True)
    fields.update(overrides)
    return ArchitectureConfig(**fields)


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """The texts the tiny tokenizer was trained on."""
    return list(TINY_TEXTS)


@pytest.fixture(scope="session")
def tiny_arch():
    """Factory for the tiny ArchitectureConfig: ``tiny_arch(hidden_size=32)`` overrides fields."""
    return tiny_architecture


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE with <pad>=0, <s>=1, </s>=2, vocab 320 (trained on TINY_TEXTS)."""
    from slimtune.finetune.tokenizer import train_tokenizer

    return train_tokenizer(TINY_TEXTS, TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    """ModelConfig of the inline tiny Llama (float32)."""
    return ModelConfig(architecture=tiny_architecture(), tokenizer_vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer, tiny_model_config):
    """A saved tiny Llama (seed 0) + its tokenizer: a directory usable as model.name_or_path."""
    from slimtune.finetune.model import build_base_model

    return build_base_model(tiny_model_config, tiny_tokenizer, seed=0,
                            save_dir=tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_dir_config(tiny_model_dir) -> ModelConfig:
    """ModelConfig pointing at the saved tiny Llama by path (as a user's recipe would)."""
    return ModelConfig(name_or_path=str(tiny_model_dir))


@pytest.fixture()
def tiny_batch(tiny_tokenizer) -> dict[str, torch.Tensor]:
    """A fixed (4, 16) batch of real token ids with labels = input_ids."""
    ids = tiny_tokenizer(" ".join(TINY_TEXTS[:8]))["input_ids"]
    assert len(ids) >= 64, "TINY_TEXTS too short for the batch"
    input_ids = torch.tensor(ids[:64]).view(4, 16)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


@pytest.fixture(scope="session")
def sharded(tmp_path_factory):
    """family -> a tiny model saved in fp32 shards of 30 KB, so every decoder layer straddles several files."""
    import zoo
    from transformers import AutoModelForCausalLM

    tok, cache = zoo.tokenizer(), {}

    def get(family: str) -> Path:
        if family not in cache:
            d = zoo.build(family, tmp_path_factory.mktemp(family), tok)
            AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).save_pretrained(d, max_shard_size="30KB")
            (d / "model.safetensors").unlink(missing_ok=True)
            cache[family] = d
        return cache[family]

    return get
