"""The streamed merge (finetune/streamed_merge.py): an adapter merged into its base one decoder layer at a time,
from a base saved in shards that layers straddle, equals the whole-model merge (PeftModel.merge_and_unload) bit for
bit, for LoRA and for QLoRA (merged into the dequantized 4-bit base), on a tied and an untied family."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_adapters import _adapted, _randomize_lora

from slimtune.finetune.export import merge_adapter
from slimtune.finetune.recipe import ModelConfig


def _tensors(directory) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
@pytest.mark.parametrize("family", ["llama", "mistral"])  # tied and untied head
def test_streamed_merge_equals_the_whole_merge(sharded, tmp_path, family, quantized):
    base = sharded(family)
    cfg = ModelConfig(name_or_path=str(base), dtype="float32")
    model = _adapted(cfg, base, quantized=quantized)
    _randomize_lora(model)
    from slimtune.finetune.adapters import save_adapter
    from slimtune.finetune.tokenizer import load_tokenizer

    save_adapter(model, tmp_path / "adapter", load_tokenizer(cfg, None))
    whole = merge_adapter(tmp_path / "adapter", tmp_path / "whole", stream=False)
    streamed = merge_adapter(tmp_path / "adapter", tmp_path / "streamed")  # the default for a local base
    assert (streamed / "model.safetensors.index.json").is_file() and not (whole / "model.safetensors.index.json")\
        .is_file()
    a, b = _tensors(whole), _tensors(streamed)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert any(not torch.equal(a[k], load_file_any(base, k)) for k in a if "q_proj" in k)  # the delta is in


def load_file_any(directory, key: str) -> torch.Tensor:
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        if key in tensors:
            return tensors[key]
    raise KeyError(key)


MERGE_PEAK = """
import json, sys
from pathlib import Path
import torch, transformers.models.llama.modeling_llama  # code both modes load, before the baseline
from slimtune.finetune.export import merge_adapter
import peft, slimtune.finetune.streamed_merge
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(str(Path(sys.argv[1])))
from slimtune.offload import current_rss_bytes, peak_rss_bytes
adapter, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
base = current_rss_bytes()
merge_adapter(adapter, out, stream=mode == "streamed")
print(json.dumps({"base": base, "peak": peak_rss_bytes()}))
"""


def test_the_streamed_merge_holds_layers_not_the_model(tmp_path):
    """A 24-layer fp32 base in 4 shards and a LoRA adapter: merging in a child holds a few layers above its start,
    the whole merge the model and more (both measured as the child's own high-water mark)."""
    import subprocess
    import sys

    import zoo
    from test_streamed_load import _write_random_shards
    from transformers import AutoModelForCausalLM, LlamaConfig

    from slimtune.finetune.adapters import apply_adapter, save_adapter
    from slimtune.finetune.recipe import AdapterConfig

    config = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                         num_attention_heads=8, tie_word_embeddings=False)
    directory = tmp_path / "base"
    directory.mkdir()
    config.save_pretrained(directory)
    _write_random_shards(directory, config, shards=4)
    tok = zoo.tokenizer()
    tok.save_pretrained(directory)
    model = apply_adapter(AutoModelForCausalLM.from_pretrained(directory), AdapterConfig(type="lora", r=4), False)
    _randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", tok)
    del model
    layer_bytes = (4 * 512 * 512 + 3 * 512 * 1536 + 2 * 512) * 4
    model_bytes = 24 * layer_bytes + 2 * 512 * 512 * 4
    peaks = {}
    for mode in ("streamed", "whole"):
        run = subprocess.run([sys.executable, "-c", MERGE_PEAK, str(tmp_path / "adapter"), str(tmp_path / mode), mode],
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        out = __import__("json").loads(run.stdout.strip().splitlines()[-1])
        peaks[mode] = out["peak"] - out["base"]
    assert peaks["whole"] > model_bytes, peaks
    assert peaks["streamed"] < 6 * layer_bytes + 2 * 512 * 512 * 4, (peaks, layer_bytes)
