"""Tokenizer training/loading, inline model building, model loading (incl. 4-bit), parameter counting."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from slimtune.finetune.errors import SlimtuneError
from slimtune.finetune.model import build_base_model, count_parameters, load_model, resolve_device
from slimtune.finetune.recipe import ModelConfig
from slimtune.finetune.tokenizer import load_tokenizer, train_tokenizer

TINY_VOCAB = 320  # tests/conftest.py

ODD_TEXTS = [
    "naïve café — 東京 🚀 Ünïcödé",
    "tabs\tand\nnewlines\r\n  double  spaces ",
    "\x00\x01 control \x7f bytes",
    "",
    "<s> looks special but is plain text </s>",
    "zzzz qqqq xyzzy never seen in training",
]


# --------------------------------------------------------------------------------------------------- tokenizer
def test_train_tokenizer_is_deterministic(tiny_texts):
    a = train_tokenizer(tiny_texts, TINY_VOCAB)
    b = train_tokenizer(tiny_texts, TINY_VOCAB)
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == TINY_VOCAB
    for text in tiny_texts[:3] + ODD_TEXTS:
        assert a(text)["input_ids"] == b(text)["input_ids"]
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_tokenizer_round_trips_arbitrary_text(tiny_tokenizer, text):
    ids = tiny_tokenizer(text)["input_ids"]
    assert all(0 <= i < len(tiny_tokenizer) for i in ids)
    assert tiny_tokenizer.unk_token_id is None or tiny_tokenizer.unk_token_id not in ids
    assert tiny_tokenizer.decode(ids) == text


def test_trained_tokenizer_compresses_its_training_text(tiny_tokenizer, tiny_texts):
    text = tiny_texts[0]
    assert len(tiny_tokenizer(text)["input_ids"]) < 0.8 * len(text.encode())  # BPE merges were learned


def test_load_tokenizer_trains_for_inline_architecture(tiny_model_config, tiny_texts):
    calls = []

    def texts():
        calls.append(1)
        return iter(tiny_texts)

    tok = load_tokenizer(tiny_model_config, texts)
    assert calls == [1] and len(tok) == TINY_VOCAB
    assert tok.get_vocab() == train_tokenizer(tiny_texts, TINY_VOCAB).get_vocab()
    with pytest.raises(SlimtuneError, match="model.tokenizer"):
        load_tokenizer(tiny_model_config, None)


def test_load_tokenizer_from_model_dir(tiny_model_dir, tiny_dir_config, tiny_tokenizer):
    tok = load_tokenizer(tiny_dir_config, None)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert tok(ODD_TEXTS[0])["input_ids"] == tiny_tokenizer(ODD_TEXTS[0])["input_ids"]


def test_load_tokenizer_without_pad_uses_eos(tmp_path, tiny_texts, tiny_arch):
    base = train_tokenizer(tiny_texts, TINY_VOCAB)
    no_pad = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    assert no_pad.pad_token is None
    no_pad.save_pretrained(tmp_path)
    tok = load_tokenizer(ModelConfig(architecture=tiny_arch(), tokenizer=str(tmp_path)), None)
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id


def test_load_tokenizer_missing_dir_names_the_key(tmp_path):
    cfg = ModelConfig(name_or_path=str(tmp_path / "nope"))
    with pytest.raises(SlimtuneError, match="model.name_or_path.*does not exist"):
        load_tokenizer(cfg, None)


# --------------------------------------------------------------------------------------------------- devices
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SlimtuneError, match="offload.device"):
            resolve_device("cuda")


# --------------------------------------------------------------------------------------------------- building
def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_build_base_model_is_seeded_and_loadable(tmp_path, tiny_tokenizer, tiny_model_config):
    dirs = [build_base_model(tiny_model_config, tiny_tokenizer, seed=s, save_dir=tmp_path / f"m{i}")
            for i, s in enumerate((7, 7, 8))]
    a, b, c = (AutoModelForCausalLM.from_pretrained(d) for d in dirs)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed must give identical weights"
    assert not torch.equal(wa["model.layers.0.self_attn.q_proj.weight"], wc["model.layers.0.self_attn.q_proj.weight"])
    cfg = a.config
    assert cfg.vocab_size == len(tiny_tokenizer) == TINY_VOCAB
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (0, 1, 2)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (64, 2)
    assert (dirs[0] / "tokenizer.json").is_file() and (dirs[0] / "model.safetensors").is_file()
    # the saved model is the built model: a forward runs and depends on the input
    out = a(torch.tensor([[1, 5, 9, 40]])).logits
    assert out.shape == (1, 4, TINY_VOCAB) and torch.isfinite(out).all()


def test_build_base_model_in_bfloat16(tmp_path, tiny_tokenizer, tiny_arch):
    cfg = ModelConfig(architecture=tiny_arch(), dtype="bfloat16")
    d = build_base_model(cfg, tiny_tokenizer, seed=0, save_dir=tmp_path / "bf16")
    model = load_model(ModelConfig(name_or_path=str(d), dtype="bfloat16"), d, "cpu", False, False)
    assert model.dtype == torch.bfloat16


def test_build_base_model_passes_hub_ids_through(tiny_tokenizer):
    cfg = ModelConfig(name_or_path="meta-llama/Meta-Llama-3-8B")
    assert build_base_model(cfg, tiny_tokenizer, seed=0, save_dir=None) == "meta-llama/Meta-Llama-3-8B"


# --------------------------------------------------------------------------------------------------- loading
def test_load_model_full_precision(tiny_model_dir, tiny_dir_config):
    model = load_model(tiny_dir_config, tiny_model_dir, "cpu", quantized=False, gradient_checkpointing=False)
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    trainable, total = count_parameters(model)
    # tied embeddings count once: 320*64 + 2 layers * (4*64*64 + 3*64*128 + 2*64) + 64
    expected = 320 * 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64) + 64
    assert total == expected == trainable


def test_load_model_4bit_uses_qlora_settings(tiny_model_dir, tiny_dir_config):
    import bitsandbytes as bnb

    model = load_model(tiny_dir_config, tiny_model_dir, "cpu", quantized=True, gradient_checkpointing=False)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    quantized = {n: m for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(quantized) == set(linears) - {"lm_head"} and len(quantized) == 14
    for m in quantized.values():
        state = m.weight.quant_state
        assert state.quant_type == "nf4"           # not BitsAndBytesConfig's fp4 default
        assert state.nested                        # double quantization of the absmax constants
        assert m.compute_dtype == torch.bfloat16   # not the fp32 default
        assert m.weight.dtype == torch.uint8
    # logical parameter count matches the full-precision model (packed uint8 counts as 2 values per byte)
    full = load_model(tiny_dir_config, tiny_model_dir, "cpu", quantized=False, gradient_checkpointing=False)
    assert count_parameters(model)[1] == count_parameters(full)[1]
    # and the 4-bit model still computes roughly the same function
    ids = torch.tensor([[1, 10, 20, 30, 40]])
    with torch.no_grad():
        ref, got = full(ids).logits.flatten(), model(ids).logits.flatten().float()
    cosine = torch.nn.functional.cosine_similarity(ref, got, dim=0)
    assert not torch.equal(ref, got) and cosine > 0.9  # NF4 rounding perturbs, it does not scramble


def test_load_model_gradient_checkpointing(tiny_model_dir, tiny_dir_config, tiny_batch):
    ref = load_model(tiny_dir_config, tiny_model_dir, "cpu", quantized=False, gradient_checkpointing=False)
    ckpt = load_model(tiny_dir_config, tiny_model_dir, "cpu", quantized=False, gradient_checkpointing=True)
    assert ckpt.is_activation_checkpointing and ckpt.config.use_cache is False
    grads = []
    for model in (ref, ckpt):
        model.train()
        model(**tiny_batch).loss.backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_load_model_missing_dir_names_the_key(tmp_path):
    cfg = ModelConfig(name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(SlimtuneError, match=r"model.name_or_path: local directory .*no-such-model does not exist"):
        load_model(cfg, cfg.name_or_path, "cpu", False, False)
    (tmp_path / "empty").mkdir()
    cfg = ModelConfig(name_or_path=str(tmp_path / "empty"))
    with pytest.raises(SlimtuneError, match="no config.json"):
        load_model(cfg, cfg.name_or_path, "cpu", False, False)


def test_load_model_unknown_hub_id_offline_names_the_key():
    cfg = ModelConfig(name_or_path="slimtune-tests/does-not-exist")
    with pytest.raises(SlimtuneError, match="model.name_or_path.*slimtune-tests/does-not-exist"):
        load_model(cfg, cfg.name_or_path, "cpu", False, False)
