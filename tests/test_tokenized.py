"""Tokenization through `datasets` (finetune/data.py tokenize_dataset): the examples of the per-row path, stored in
Arrow, in several processes or one, and cached so that a second run on the same data tokenizes nothing."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
from test_data import ALPACA_ROWS, CHAT, TEMPLATE, small_tokenizer, write_jsonl

from slimtune.finetune import tokens as tokens_module
from slimtune.finetune.batches import batches, take
from slimtune.finetune.data import load_records
from slimtune.finetune.errors import DataError
from slimtune.finetune.recipe import DataConfig
from slimtune.finetune.tokens import tokenize_dataset, tokenize_rows

ROWS = [{**r, "instruction": f"{r['instruction']} (variant {k})"} for k in range(40) for r in ALPACA_ROWS]


@pytest.fixture
def tokenizer():
    return small_tokenizer()


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A datasets cache of the test's own: loads and tokenizations land there."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    return tmp_path / "hf-cache"


@pytest.fixture
def calls(monkeypatch):
    """How many rows each tokenization really encoded (tokens._tokenize runs in this process with num_proc 1)."""
    counted = []
    real = tokens_module._tokenize

    def counting(rows, *args):
        counted.append(len(rows))
        return real(rows, *args)

    monkeypatch.setattr(tokens_module, "_tokenize", counting)
    return counted


def as_lists(examples) -> list[dict]:
    return take(examples, range(len(examples)))


@pytest.mark.parametrize("fmt", ["alpaca", "messages-template", "messages-builtin"])
def test_the_arrow_examples_are_the_per_row_examples(tmp_path, tokenizer, cache_dir, fmt):
    if fmt.startswith("messages"):
        rows = [{"messages": [*CHAT[:-1], {"role": "assistant", "content": f"{k}"}]} for k in range(30)]
        tokenizer.chat_template = TEMPLATE if fmt == "messages-template" else None
    else:
        rows = ROWS
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), format=fmt.split("-")[0], max_length=40)
    train, _ = load_records(cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some alpaca rows are cut away: both paths drop the same ones
        expected = tokenize_rows(list(train), cfg, tokenizer)
        examples = tokenize_dataset(train, cfg, tokenizer)
    assert isinstance(examples, datasets.Dataset) and examples.features["input_ids"].feature.dtype == "int32"
    assert as_lists(examples) == expected
    assert examples.cache_files and all(str(cache_dir) in f["filename"] for f in examples.cache_files)  # on disk


def test_two_tokenizing_processes_give_the_one_process_examples_in_order(tmp_path, tokenizer, cache_dir):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), num_proc=2)
    two = tokenize_dataset(load_records(cfg, 0)[0], cfg, tokenizer)
    assert len(two.cache_files) == 2 and as_lists(two) == tokenize_rows(ROWS, cfg, tokenizer)
    one = tokenize_dataset(load_records(cfg, 0)[0], cfg.model_copy(update={"num_proc": 1}), tokenizer)
    assert one.cache_files == two.cache_files  # the cache does not depend on how many processes wrote it


def test_a_second_run_loads_the_cached_tokenization_and_a_change_tokenizes_again(tmp_path, tokenizer, cache_dir,
                                                                                 calls):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)

    def run(**settings):
        cfg = DataConfig(path=str(path), val_size=0.1, **settings)
        train, _ = load_records(cfg, seed=0)  # a fresh load, as a new run does
        return tokenize_dataset(train, cfg, tokenizer)

    first = run()
    assert sum(calls) == len(first) == 180  # every training row encoded once
    calls.clear()
    second = run()
    assert calls == [] and as_lists(second) == as_lists(first)  # no re-tokenization
    assert second.cache_files == first.cache_files
    third = run(max_length=64)  # another max_length: another tokenization
    assert sum(calls) == 180 and third.cache_files != first.cache_files
    calls.clear()
    write_jsonl(path, [*ROWS, {"instruction": "New row.", "input": "", "output": "new"}])  # the data changed
    fourth = run()
    assert sum(calls) == len(fourth) and fourth.cache_files != first.cache_files
    calls.clear()
    tokenizer.add_tokens(["<new-token>"])  # the tokenizer changed
    run()
    assert sum(calls) > 0


def test_rows_without_cache_files_are_tokenized_into_memory_arrow(tokenizer, cache_dir):
    rows = datasets.Dataset.from_list(ROWS[:20])
    examples = tokenize_dataset(rows, DataConfig(path="x.jsonl"), tokenizer)
    assert examples.cache_files == [] and as_lists(examples) == tokenize_rows(ROWS[:20], DataConfig(path="x.jsonl"),
                                                                              tokenizer)
    assert not cache_dir.exists()  # nothing written for in-memory rows


def test_a_dataset_left_empty_by_truncation_is_an_error_naming_it(tmp_path, tokenizer, cache_dir):
    long_prompt = {"instruction": "Name a color. " * 30, "input": "", "output": "blue"}
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "long.jsonl", [long_prompt] * 3)), max_length=16)
    with pytest.raises(DataError, match=r"data.path .*long.jsonl: every one of the 3 examples .* raise "
                                        r"data.max_length"):
        tokenize_dataset(load_records(cfg, 0)[0], cfg, tokenizer, name=f"data.path {cfg.path}")


def test_batches_from_arrow_equal_batches_from_lists(tmp_path, tokenizer, cache_dir):
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)))
    examples = tokenize_dataset(load_records(cfg, 0)[0], cfg, tokenizer)
    lists = as_lists(examples)
    for packed in (False, True):
        arrow = list(batches(examples, 8, seed=3, epoch=1, pad_id=0, skip=2, packed=packed))
        plain = list(batches(lists, 8, seed=3, epoch=1, pad_id=0, skip=2, packed=packed))
        assert len(arrow) == len(plain) == 23
        assert all(a.keys() == p.keys() and all((a[k] == p[k]).all() for k in a) for a, p in zip(arrow, plain))


def test_the_trainer_reads_its_examples_from_the_cached_arrow_file(tmp_path, monkeypatch):
    from test_train import tiny

    from slimtune.finetune import recipe_from_dict
    from slimtune.finetune.build import prepare

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    prepared = prepare(recipe_from_dict(tiny(tmp_path, "data.val_size=0", "data.metric=none")))
    files = [f["filename"] for f in prepared.train_examples.cache_files]
    assert files and all("slimtune-tokenized" in f for f in files)
    assert json.loads(json.dumps(prepared.train_examples[0]))["input_ids"]  # token ids, read from Arrow
