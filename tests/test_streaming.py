"""Streamed data (``data.streaming``, finetune/streaming.py): the examples of the in-memory path, a seeded shuffle,
rows checked as they are read, and a resumed run that continues with exactly the next example."""

from __future__ import annotations

import warnings

import datasets
import pytest
from test_data import ALPACA_ROWS, small_tokenizer, write_jsonl
from test_train import resumed_equals_uninterrupted, tiny

from slimtune.finetune import DataError, RecipeError, recipe_from_dict, train
from slimtune.finetune.data import open_stream
from slimtune.finetune.recipe import DataConfig
from slimtune.finetune.streaming import TokenStream, stream_batches
from slimtune.finetune.tokens import tokenize_rows

LONG_PROMPT = {"instruction": "Name a color. " * 30, "input": "", "output": "blue"}  # cut away at max_length 48
ROWS = [{**r, "instruction": f"{r['instruction']} #{k}"} for k in range(20) for r in ALPACA_ROWS]
ROWS[7] = ROWS[33] = LONG_PROMPT


def stream(tmp_path, buffer: int) -> TokenStream:
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), max_length=48, streaming=True)
    return TokenStream(open_stream(cfg), cfg, small_tokenizer(), buffer)


def test_a_stream_in_order_gives_the_in_memory_examples(tmp_path):
    s = stream(tmp_path, buffer=0)
    with pytest.warns(UserWarning, match="data.streaming: an example's response starts after data.max_length"):
        got = list(s.examples(seed=0, epoch=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = tokenize_rows(ROWS, s.cfg, s.tokenizer)
    assert [e for _, e in got] == expected and len(expected) == 98
    assert [position for position, _ in got][:8] == [1, 2, 3, 4, 5, 6, 7, 9]  # row 8 (the long prompt) was read


def test_the_shuffle_is_seeded_per_epoch_and_covers_every_example(tmp_path):
    s = stream(tmp_path, buffer=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = [e for _, e in s.examples(seed=5, epoch=0)]
        assert first == [e for _, e in s.examples(seed=5, epoch=0)]
        second = [e for _, e in s.examples(seed=5, epoch=1)]
        in_order = [e for _, e in stream(tmp_path, buffer=0).examples(seed=5, epoch=0)]
    assert first != second and first != in_order
    key = sorted(map(str, in_order))
    assert sorted(map(str, first)) == key and sorted(map(str, second)) == key


def test_resuming_at_any_saved_position_continues_with_the_exact_next_example(tmp_path):
    s = stream(tmp_path, buffer=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = list(stream_batches(s, 4, seed=2, epoch=1, pad_id=0))
        for k in (1, 2, 9, len(whole) - 1):  # after the k-th batch, as a checkpoint stores it
            position = whole[k - 1][1]
            rest = list(stream_batches(s, 4, seed=2, epoch=1, pad_id=0, start=position))
            assert len(rest) == len(whole) - k
            assert all((a["input_ids"] == b["input_ids"]).all() and (a["labels"] == b["labels"]).all()
                       for (a, _), (b, _) in zip(rest, whole[k:]))


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_uninterrupted_losses(tmp_path, monkeypatch):
    # 40 streamed rows (8 eval rows taken off the start) / 4 per micro-batch x accumulation 2 = 5 steps per epoch:
    # the checkpoint at step 4 is mid-epoch, and the run crosses two epoch boundaries
    args = ("data.streaming=true", "data.shuffle_buffer=16", "data.val_size=8", "data.metric=none",
            "training.max_steps=12", "output.save_steps=4", "training.gradient_accumulation_steps=2",
            "adapter.dropout=0.1")
    full, _ = resumed_equals_uninterrupted(tmp_path, monkeypatch, args)
    assert full.eval_after["eval_loss"] < full.eval_before["eval_loss"]


def test_a_bad_row_stops_the_stream_naming_its_file_and_line(tmp_path):
    rows = [*ROWS[:30], {"instruction": "No output here.", "input": ""}, *ROWS[30:]]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "bad.jsonl", rows)), streaming=True)
    s = TokenStream(open_stream(cfg), cfg, small_tokenizer(), 0)
    with pytest.raises(DataError, match=r"bad.jsonl line 31: 'output' must be a string, got null"):
        list(s.examples(seed=0, epoch=0))


def test_a_hub_dataset_is_streamed_with_its_subset_and_split(tmp_path, monkeypatch):
    asked = {}

    def fake_load(name, subset=None, split=None, streaming=False, **kwargs):
        asked.update(name=name, subset=subset, split=split, streaming=streaming)
        return datasets.IterableDataset.from_generator(lambda: iter(ALPACA_ROWS))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = DataConfig(path="org/some-dataset", subset="main", split="test", streaming=True)
    s = TokenStream(open_stream(cfg), cfg, small_tokenizer(), 0)
    assert [e for _, e in s.examples(0, 0)] == tokenize_rows(ALPACA_ROWS, cfg, s.tokenizer)
    assert asked == {"name": "org/some-dataset", "subset": "main", "split": "test", "streaming": True}


@pytest.mark.parametrize("overrides, problem", [
    (("training.max_steps=-1",), "data.streaming needs training.max_steps"),
    (("data.val_size=0.1",), "a fraction of a stream of unknown length"),
    (("data.path=null", "data.sources=[{path: x.jsonl}, {path: y.jsonl}]", "data.mix_stop=all_exhausted"),
     "repeating streamed sources is not built"),
])
def test_what_a_stream_cannot_do_is_refused_in_the_recipe(tmp_path, overrides, problem):
    with pytest.raises(RecipeError, match=problem):
        recipe_from_dict(tiny(tmp_path, "data.streaming=true", "data.metric=none", *overrides))


STREAMED = ("data.streaming=true", "data.shuffle_buffer=16", "data.val_size=8", "data.metric=none",
            "training.max_steps=12", "training.gradient_accumulation_steps=2", "adapter.dropout=0.1")


def test_the_hugging_face_route_streams_the_batches_of_slimtune_train_and_resumes_exactly(tmp_path):
    from test_hf import DieAtStep, Interrupt

    from slimtune.finetune.hf import from_recipe

    ours = train(recipe_from_dict(tiny(tmp_path / "cli", *STREAMED)), progress=False).losses
    args = (*STREAMED, "output.save_steps=4")
    full = from_recipe(recipe_from_dict(tiny(tmp_path / "hf", *args)))
    full.train()
    assert full.step_losses == pytest.approx(ours, rel=1e-6) and len(ours) == 12  # across two epoch ends
    cut = from_recipe(recipe_from_dict(tiny(tmp_path / "cut", *args)), callbacks=[DieAtStep(6)])
    with pytest.raises(Interrupt):
        cut.train()
    resumed = from_recipe(recipe_from_dict(tiny(tmp_path / "cut", *args, "output.overwrite_output_dir=true")))
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "run" / "checkpoint-4"))
    assert resumed.step_losses == full.step_losses[4:]


# ------------------------------------------------------------------------------------------- a streamed mixture
CHAT_ROWS = [{"dialog": [{"from": "human", "value": f"Say {k} twice."}, {"from": "gpt", "value": f"{k} {k}"}]}
             for k in range(120)]


def mixture(tmp_path, **settings) -> DataConfig:
    a = write_jsonl(tmp_path / "a.jsonl", [{**r, "instruction": f"Count {k}."} for k, r in
                                          enumerate(ALPACA_ROWS * 72)])  # 360 rows
    b = write_jsonl(tmp_path / "b.jsonl", CHAT_ROWS)
    return DataConfig(sources=[{"path": str(a), "weight": 3},
                               {"path": str(b), "weight": 1, "format": "sharegpt",
                                "columns": {"conversations": "dialog"}}], streaming=True, **settings)


def mixed_stream(cfg: DataConfig, tokenizer):
    from slimtune.finetune.data_sources import load_sources, mixed_examples, tokenized

    sources = load_sources(cfg, 0)
    return mixed_examples(cfg, sources, tokenized(sources, tokenizer, "train"), 0), sources


def test_a_streamed_mixture_draws_by_weight_until_the_first_source_runs_out_seeded(tmp_path):
    tokenizer = small_tokenizer()
    stream, sources = mixed_stream(mixture(tmp_path, shuffle_buffer=0), tokenizer)
    drawn = list(stream.examples(seed=4, epoch=0))
    own = [[e for _, e in s.examples(0, 0)] for s in stream.sources]
    counts = [drawn[-1][0][1], drawn[-1][0][2]]  # rows read of each source
    assert counts[0] == 360 or counts[1] == 120  # the epoch ended when one source ran out
    assert abs(counts[0] / sum(counts) - 0.75) < 0.05 and len(drawn) == sum(counts)
    # each source's examples come in its own order, interleaved
    assert [e for p, e in drawn if e in own[1]] == own[1][:counts[1]]
    assert [p for p, _ in drawn] == [p for p, _ in stream.examples(seed=4, epoch=0)]  # seeded
    assert [p for p, _ in drawn] != [p for p, _ in stream.examples(seed=4, epoch=1)]


def test_a_streamed_mixture_resumes_at_any_saved_position_with_the_exact_next_example(tmp_path):
    stream, _ = mixed_stream(mixture(tmp_path, shuffle_buffer=16, max_samples=200), small_tokenizer())
    whole = list(stream_batches(stream, 4, seed=2, epoch=1, pad_id=0))
    assert len(whole) == 50 and whole[-1][1][0] == 200  # data.max_samples caps the draws
    for k in (1, 13, 49):
        rest = list(stream_batches(stream, 4, seed=2, epoch=1, pad_id=0, start=whole[k - 1][1]))
        assert len(rest) == len(whole) - k
        assert all((a["input_ids"] == b["input_ids"]).all() for (a, _), (b, _) in zip(rest, whole[k:]))


def test_a_streamed_mixture_run_killed_mid_epoch_resumes_to_the_uninterrupted_losses(tmp_path, monkeypatch):
    cfg = mixture(tmp_path)
    sources = [s.model_dump(exclude_none=True) for s in cfg.sources]
    args = ("data.path=null", f"data.sources={sources}", "data.streaming=true", "data.shuffle_buffer=16",
            "data.max_samples=40", "data.val_size=4", "data.metric=none", "training.max_steps=12",
            "output.save_steps=4", "training.gradient_accumulation_steps=2", "adapter.dropout=0.1")
    full, _ = resumed_equals_uninterrupted(tmp_path, monkeypatch, args)
    assert full.eval_after["eval_loss"] < full.eval_before["eval_loss"]
