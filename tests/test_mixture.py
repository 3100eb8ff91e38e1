"""Dataset mixtures (finetune/data_sources.py): ``data.sources`` with weights and per-source formats draws its
examples in the configured proportions, seeded; errors name the source; a recipe trains on a mixture."""

from __future__ import annotations

import json

import datasets
import pytest
from test_data import small_tokenizer, write_jsonl

from slimtune.finetune import RecipeError, recipe_from_dict
from slimtune.finetune.batches import take
from slimtune.finetune.data_sources import load_sources, mixed_examples, tokenized
from slimtune.finetune.errors import DataError
from slimtune.finetune.recipe import DataConfig
from slimtune.finetune.tokens import tokenize_rows

ALPACA = [{"instruction": f"Count to {k}.", "input": "", "output": f"{k} done"} for k in range(300)]
SHAREGPT = [{"dialog": [{"from": "human", "value": f"Say {k} twice."}, {"from": "gpt", "value": f"{k} {k}"}]}
            for k in range(300)]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), write_jsonl(tmp_path / "chat.jsonl", SHAREGPT)


def mixture(files, seed=0, **settings) -> DataConfig:
    a, b = files
    return DataConfig(sources=[{"path": str(a), "weight": 3},
                               {"path": str(b), "weight": 1, "format": "sharegpt",
                                "columns": {"conversations": "dialog"}}], **settings)


def mixed(cfg: DataConfig, seed: int = 0):
    tokenizer = small_tokenizer()
    sources = load_sources(cfg, seed)
    return mixed_examples(cfg, sources, tokenized(sources, tokenizer, "train"), seed), sources, tokenizer


def origin(examples, sources, tokenizer) -> list[int]:
    """Which source each mixed example comes from (its token ids are that source's own tokenization's)."""
    own = [{json.dumps(e) for e in tokenize_rows(s.train, s.cfg, tokenizer)} for s in sources]
    found = []
    for e in take(examples, range(len(examples))):
        (index,) = [i for i, keys in enumerate(own) if json.dumps(e) in keys]
        found.append(index)
    return found


def test_a_mixture_draws_its_sources_in_the_configured_proportions_seeded(files):
    examples, sources, tokenizer = mixed(mixture(files))
    drawn = origin(examples, sources, tokenizer)
    # first_exhausted: the draws stop when the alpaca source (weight 3 of 4) has given its 300 examples
    assert drawn.count(0) == 300 and abs(drawn.count(0) / len(drawn) - 0.75) < 0.06
    again, _, _ = mixed(mixture(files))
    assert take(again, range(len(again))) == take(examples, range(len(examples)))  # seeded: the same draw
    other, _, _ = mixed(mixture(files), seed=1)
    assert take(other, range(len(other))) != take(examples, range(len(examples)))


def test_all_exhausted_sees_every_example_of_every_source(files):
    examples, sources, tokenizer = mixed(mixture(files, mix_stop="all_exhausted"))
    drawn = origin(examples, sources, tokenizer)
    assert drawn.count(1) >= 300 and abs(drawn.count(0) / len(drawn) - 0.75) < 0.06  # the chat source repeats
    assert {json.dumps(e) for e in take(examples, range(len(examples)))} == {
        json.dumps(e) for s in sources for e in tokenize_rows(s.train, s.cfg, tokenizer)}


def test_each_source_reads_with_its_own_format_columns_and_val_split(files):
    cfg = mixture(files, val_size=0.1, max_samples=100)
    examples, sources, tokenizer = mixed(cfg)
    assert [len(s.train) for s in sources] == [270, 270] and [len(s.eval) for s in sources] == [30, 30]
    assert sources[1].cfg.format == "messages"  # sharegpt turns are chat messages once loaded
    assert len(examples) == 100  # data.max_samples caps the mixture


def test_a_bad_row_in_a_source_names_the_source_key_file_and_line(files, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*SHAREGPT[:3], {"dialog": [{"from": "human", "value": "hi"}]}])
    cfg = DataConfig(sources=[{"path": str(files[0])}, {"path": str(bad), "format": "sharegpt",
                                                          "columns": {"conversations": "dialog"}}])
    with pytest.raises(DataError, match=r"bad.jsonl line 4: 'dialog' must end with a gpt turn"):
        load_sources(cfg, 0)
    wrong = DataConfig(sources=[{"path": str(files[0])}, {"path": str(files[1]), "format": "messages"}])
    with pytest.raises(DataError, match=r"chat.jsonl: missing column 'messages' \(columns found: dialog; set "
                                        r"data.sources\[1\].columns.messages, or check data.sources\[1\].format"):
        load_sources(wrong, 0)
    missing = DataConfig(sources=[{"path": str(files[0])}, {"path": str(tmp_path / "nope.jsonl")}])
    with pytest.raises(DataError, match=r"data.sources\[1\].path: .*nope.jsonl does not exist"):
        load_sources(missing, 0)


def test_the_recipe_takes_sources_or_a_list_and_refuses_both_or_neither(tmp_path, files):
    from test_train import tiny

    base = tiny(tmp_path, "data.metric=none", "data.val_size=0", "model.architecture.max_position_embeddings=512")
    del base["data"]["path"]
    listed = {**base, "data": [{"path": str(files[0]), "weight": 2}, {"path": str(files[1]), "format": "sharegpt",
                                                                        "columns": {"conversations": "dialog"}}]}
    recipe = recipe_from_dict(listed)
    assert [s.weight for s in recipe.data.sources] == [2, 1]
    assert recipe.data.describe().startswith(f"a mixture of alpaca from {files[0]} (67%), sharegpt from")
    with pytest.raises(RecipeError, match="data.path .* or data.sources .* is required, not both"):
        recipe_from_dict({**base, "data": {"path": str(files[0]), "sources": [{"path": str(files[1])}]}})
    with pytest.raises(RecipeError, match="data.path .* or data.sources .* is required"):
        recipe_from_dict({**base, "data": {"format": "alpaca"}})
    with pytest.raises(RecipeError, match=r"data.sources.0.weight"):
        recipe_from_dict({**base, "data": [{"path": str(files[0]), "weight": 0}]})


def test_slimtune_train_runs_a_mixture(tmp_path, files):
    from test_train import tiny

    from slimtune.finetune import train

    data = tiny(tmp_path, "data.metric=none", "data.val_size=0.1")
    data["data"] = {"sources": [{"path": str(files[0]), "weight": 3},
                                {"path": str(files[1]), "format": "sharegpt", "columns": {"conversations": "dialog"}}],
                    "max_length": 96, "max_samples": 64, "val_size": 0.1}
    result = train(recipe_from_dict(data))
    assert result.steps == 8 and all(loss == loss for loss in result.losses)  # finite, no NaN
    assert result.eval_after is not None and result.eval_after["eval_loss"] < result.eval_before["eval_loss"]


def test_a_mixture_with_an_eval_file_reads_it_with_datas_own_format(files, tmp_path):
    evaluation = write_jsonl(tmp_path / "eval.jsonl", ALPACA[:7])
    cfg = mixture(files, eval_path=str(evaluation), val_size=0.1)
    with pytest.warns(UserWarning, match="data.eval_path is set, so data.val_size 0.1 is ignored"):
        sources = load_sources(cfg, 0)
    assert [len(s.train) for s in sources[:2]] == [300, 300] and [s.eval for s in sources[:2]] == [None, None]
    assert sources[2].train is None and len(sources[2].eval) == 7 and sources[2].cfg.format == "alpaca"
    (examples,) = tokenized(sources, small_tokenizer(), "eval")
    assert take(examples, range(7)) == tokenize_rows(ALPACA[:7], sources[2].cfg, small_tokenizer())
