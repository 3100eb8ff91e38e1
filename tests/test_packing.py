"""data.packing: padding-free micro-batches (finetune/data.py ``collate(packed=True)``) give each example exactly
the loss and gradient it has in a padded batch, and examples side by side never see each other."""

from __future__ import annotations

import pytest
import torch
import transformers
import zoo
from test_train import tiny

from slimtune.finetune import SlimtuneError, recipe_from_dict, train
from slimtune.finetune.batches import collate, input_tokens
from slimtune.finetune.model import PACKING_MODEL_TYPES, check_packing
from slimtune.finetune.tokens import IGNORE_INDEX

CONFIGS = zoo._configs(zoo.VOCAB, 0, 1, 2)


def tiny_model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family])
    model.config.use_cache = False  # what check_packing sets
    return model


def examples(lengths=(7, 3, 11, 5), seed=0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, zoo.VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX, *ids[1:3], IGNORE_INDEX, *ids[4:]][:n]})
    return out


def per_example_losses(model, batch, rows) -> list[torch.Tensor]:
    """Each example's summed next-token loss, read from a padded (one example per row) or packed (one row) batch."""
    logits = model(**batch).logits.float()
    out, offset = [], 0
    for r, e in enumerate(rows):
        n = len(e["input_ids"])
        row, at = (0, offset) if "position_ids" in batch else (r, 0)
        lg = logits[row, at:at + n - 1]
        target = torch.tensor(e["labels"][1:])
        out.append(torch.nn.functional.cross_entropy(lg, target, ignore_index=IGNORE_INDEX, reduction="sum"))
        offset += n
    return out


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_packed_losses_and_gradients_equal_the_padded_ones(family):
    rows = examples()
    model = tiny_model(family)
    padded, packed = collate(rows, pad_id=0), collate(rows, pad_id=0, packed=True)
    assert input_tokens(packed) == input_tokens(padded) == sum(len(e["input_ids"]) for e in rows)
    grads = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        model.zero_grad()
        losses = per_example_losses(model, batch, rows)
        model(**batch).loss.backward()  # the model's own loss: a mean over the same supervised tokens
        grads[name] = (torch.stack(losses).detach(), [p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(grads["packed"][0], grads["padded"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["packed"][1], grads["padded"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_packed_examples_cannot_see_each_other_exactly_on_the_verified_model_types(family):
    model = tiny_model(family).eval()
    a, a2, b = examples((6, 6, 8), seed=1)
    with torch.no_grad():
        first = model(**collate([a, b], pad_id=0, packed=True)).logits[0, 6:]
        changed = model(**collate([a2, b], pad_id=0, packed=True)).logits[0, 6:]
        alone = model(**collate([b], pad_id=0, packed=True)).logits[0]
    isolated = torch.equal(first, changed) and torch.allclose(first, alone, rtol=1e-5, atol=1e-5)
    assert isolated == (model.config.model_type in PACKING_MODEL_TYPES), family


def test_packing_is_refused_with_the_reason_where_it_would_leak():
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["opt"])
    with pytest.raises(SlimtuneError, match="opt models are not known to keep packed examples apart"):
        check_packing(model)
    llama = tiny_model("llama")
    llama.config.use_cache = True
    check_packing(llama)
    assert llama.config.use_cache is False  # transformers detects packing only without a cache


@pytest.mark.parametrize("kind", [(), ("adapter.type=mixlora", "adapter.num_experts=4", "adapter.top_k=2"),
                                  ("offload.params=cpu",), ("adapter.type=none", "optimizer.name=mezo",
                                                            "training.learning_rate=1e-3", "training.max_grad_norm=0")],
                         ids=["lora", "mixlora", "streamed-layers", "mezo"])
def test_a_packed_run_trains_the_padded_runs_trajectory(tmp_path, kind):
    common = ("data.metric=none", "adapter.dropout=0", "training.max_steps=6", "training.per_device_train_batch_size=4",
              *kind)
    padded = train(recipe_from_dict(tiny(tmp_path / "a", *common)), progress=False)
    packed = train(recipe_from_dict(tiny(tmp_path / "b", *common, "data.packing=true")), progress=False)
    assert packed.losses == pytest.approx(padded.losses, rel=1e-5)
