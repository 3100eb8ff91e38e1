"""Tiny models of ten Hugging Face decoder families, built from their configs and saved as local model directories
(config.json + safetensors + tokenizer), as a user's ``model.name_or_path`` would point at them.

Every model is 2 layers, hidden 64, 4 heads, vocab = a byte-level BPE trained on the quickstart data, seeded, so a
directory is built in well under a second and the same seed gives the same weights. The configs keep each
family's own structure (fused projections, biases, non-gated MLPs, layer norms, sliding windows, soft-capping),
which is what the support matrix (tests/support_matrix.py) exercises.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "configs" / "data" / "quickstart.jsonl"
VOCAB = 384
HIDDEN, INTER, LAYERS, HEADS = 64, 128, 2, 4


def _configs(vocab: int, pad: int, bos: int, eos: int) -> dict:
    """family -> transformers config of a tiny model of that family."""
    import transformers as tf

    ids = dict(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    rope = dict(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                max_position_embeddings=256, **ids)
    return {
        "llama": tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **rope),
        "mistral": tf.MistralConfig(num_key_value_heads=2, sliding_window=64, tie_word_embeddings=False, **rope),
        "qwen2": tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **rope),
        "qwen3": tf.Qwen3Config(num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **rope),
        "gemma2": tf.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=32, query_pre_attn_scalar=16,
                                  **rope),
        "phi3": tf.Phi3Config(num_key_value_heads=2, tie_word_embeddings=False, **rope),
        "phi": tf.PhiConfig(partial_rotary_factor=0.5, tie_word_embeddings=False, **rope),
        "gpt_neox": tf.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, max_position_embeddings=256, rotary_pct=0.25,
                                     tie_word_embeddings=False, **ids),
        "opt": tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=INTER, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            word_embed_proj_dim=HIDDEN, max_position_embeddings=256, **ids),
        "gpt2": tf.GPT2Config(n_embd=HIDDEN, n_inner=INTER, n_layer=LAYERS, n_head=HEADS, n_positions=256, **ids),
    }


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "phi", "gpt_neox", "opt", "gpt2")


def texts(limit: int = 400) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:limit]]
    return [" ".join(str(r.get(k, "")) for k in ("instruction", "input", "output")) for r in rows]


def tokenizer():
    from slimtune.finetune.tokenizer import train_tokenizer

    return train_tokenizer(texts(), VOCAB)


def build(family: str, directory: Path, tok=None, seed: int = 0) -> Path:
    """Save a tiny ``family`` model with random weights (seeded) and ``tok`` to ``directory``; returns it."""
    from transformers import AutoModelForCausalLM

    tok = tok or tokenizer()
    config = _configs(len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id)[family]
    config.initializer_range = 0.1  # LoRA leaves the embedding frozen: give the logits room (configs/quickstart.yaml)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return directory
