"""finetune/data.py, tokens.py, batches.py: loading and validation, prompt formatting, label masking, truncation,
packing, batching."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from slimtune.finetune.batches import batches, collate, num_batches
from slimtune.finetune.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    eval_prompts,
    exact_match,
    format_example,
    load_records,
    record_texts,
)
from slimtune.finetune.errors import DataError
from slimtune.finetune.recipe import DataConfig
from slimtune.finetune.tokens import IGNORE_INDEX, prompt_ids, tokenize_rows

datasets.disable_progress_bars()

ALPACA_ROWS = [
    {"instruction": "Add 2 and 2.", "input": "", "output": "4"},
    {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
    {"instruction": "Name a color.", "input": "", "output": "blue"},
    {"instruction": "Reverse the word.", "input": "abc", "output": "cba"},
    {"instruction": "Say nothing.", "input": "", "output": "None"},
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 3+4?"},
        {"role": "assistant", "content": "7"}]
TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'] + ']: ' + m['content'] }}"
            "{% if m['role'] == 'assistant' %}{{ '</s>' }}{% endif %}{{ '\\n' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '[assistant]: ' }}{% endif %}")


@pytest.fixture
def tokenizer():
    return small_tokenizer()


def small_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on these rows, with bos, eos and pad."""
    corpus = [ALPACA_PROMPT.format(instruction=r["instruction"], input=r["input"]) + r["output"]
              for r in ALPACA_ROWS]
    corpus += ["<|system|>\n<|user|>\n<|assistant|>\nHello! Be brief. What is 3+4? [assistant]: [user]:"] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def write_jsonl(path, rows, blank_after=None):
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path, rows, header=("instruction", "input", "output")):
    import csv
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([r[h] for h in header])
    return path


def trained_text(example, tokenizer):
    """Decode the tokens that carry a label (loss)."""
    return tokenizer.decode([t for t, lab in zip(example["input_ids"], example["labels"]) if lab != IGNORE_INDEX])


def trained_spans(example, tokenizer):
    """Decode each contiguous run of trained tokens separately."""
    spans, current = [], []
    for t, lab in zip(example["input_ids"], example["labels"]):
        if lab != IGNORE_INDEX:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    return [tokenizer.decode(s) for s in spans + ([current] if current else [])]


# --------------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_each_file_type_loads_same_rows(tmp_path, kind):
    path = tmp_path / f"train.{kind}"
    if kind == "jsonl":
        write_jsonl(path, ALPACA_ROWS)
    elif kind == "json":
        path.write_text(json.dumps(ALPACA_ROWS, indent=1))
    elif kind == "csv":
        write_csv(path, ALPACA_ROWS)
    else:
        datasets.Dataset.from_list(ALPACA_ROWS).to_parquet(str(path))
    train, ev = load_records(DataConfig(path=str(path)), seed=0)
    assert ev is None
    assert [r["output"] for r in train] == ["4", "chat", "blue", "cba", "None"]  # CSV: "4" and "None" stay strings
    assert [r["instruction"] for r in train] == [r["instruction"] for r in ALPACA_ROWS]
    # empty input: "" (JSON, parquet) or None (empty CSV cell); both mean "no input"
    assert train[0]["input"] in ("", None) and train[1]["input"] == "cat"
    assert format_example(train[0], DataConfig(path=str(path)), None)[0] == \
        ALPACA_PROMPT_NO_INPUT.format(instruction="Add 2 and 2.")


def test_directory_loads_every_file_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ALPACA_ROWS[2:])
    write_csv(tmp_path / "a.csv", ALPACA_ROWS[:2])
    (tmp_path / "notes.txt").write_text("ignored")
    train, _ = load_records(DataConfig(path=str(tmp_path)), seed=0)
    assert [r["output"] for r in train] == [r["output"] for r in ALPACA_ROWS]


def test_missing_optional_input_column_means_no_input(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "Hi", "output": "Yo"}])
    cfg = DataConfig(path=str(path))
    train, _ = load_records(cfg, seed=0)
    assert format_example(train[0], cfg, None) == (ALPACA_PROMPT_NO_INPUT.format(instruction="Hi"), "Yo")


def test_custom_column_names(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Hi", "answer": "Yo", "extra": 1}])
    cfg = DataConfig(path=str(path), columns={"instruction": "prompt", "output": "answer"})
    train, _ = load_records(cfg, seed=0)
    assert train.column_names == ["prompt", "input", "answer"]  # only the format's columns are kept
    assert format_example(train[0], cfg, None)[1] == "Yo"


def test_val_size_fraction_and_count_are_seeded_and_disjoint(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(50)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    frac = DataConfig(path=str(path), format="text", val_size=0.1)
    train, ev = load_records(frac, seed=1)
    assert (len(train), len(ev)) == (45, 5)
    assert sorted(r["text"] for r in list(train) + list(ev)) == sorted(r["text"] for r in rows)
    again_train, again_ev = load_records(frac, seed=1)
    assert list(again_ev) == list(ev) and list(again_train) == list(train)
    _, other_ev = load_records(frac, seed=2)
    assert list(other_ev) != list(ev)
    train, ev = load_records(DataConfig(path=str(path), format="text", val_size=7), seed=1)
    assert (len(train), len(ev)) == (43, 7)
    with pytest.raises(DataError, match=r"val_size 50 .*leaving none to train"):
        load_records(DataConfig(path=str(path), format="text", val_size=50), seed=1)


def test_max_samples_caps_train_only(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"row {i}"} for i in range(50)])
    _, full_ev = load_records(DataConfig(path=str(path), format="text", val_size=10), seed=0)
    train, ev = load_records(DataConfig(path=str(path), format="text", val_size=10, max_samples=8), seed=0)
    assert len(train) == 8 and list(ev) == list(full_ev)
    train, ev = load_records(DataConfig(path=str(path), format="text", max_samples=3), seed=0)
    assert [r["text"] for r in train] == ["row 0", "row 1", "row 2"] and ev is None


def test_eval_path_is_loaded_and_validated_the_same_way(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", ALPACA_ROWS)
    eval_path = write_csv(tmp_path / "eval.csv", ALPACA_ROWS[:2])
    train, ev = load_records(DataConfig(path=str(train_path), eval_path=str(eval_path), max_samples=2), seed=0)
    assert len(train) == 2 and [r["output"] for r in ev] == ["4", "chat"]
    write_csv(eval_path, [{"instruction": "x", "input": "", "output": ""}])
    with pytest.raises(DataError, match=r"eval\.csv line 2 \(row 1\): 'output' must be a string, got an empty cell"):
        load_records(DataConfig(path=str(train_path), eval_path=str(eval_path)), seed=0)


# --------------------------------------------------------------------------------------------------- bad data
def test_broken_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": "c"\n{"text": "d"}\n')
    with pytest.raises(DataError, match=r"train\.jsonl line 4: invalid JSON"):
        load_records(DataConfig(path=str(path), format="text"), seed=0)


def test_null_and_non_string_fields_name_the_line_and_field(tmp_path):
    rows = [dict(r) for r in ALPACA_ROWS]
    rows[3]["output"] = None
    path = write_jsonl(tmp_path / "train.jsonl", rows, blank_after=1)  # a blank line 2 shifts row 4 to line 5
    with pytest.raises(DataError, match=r"train\.jsonl line 5: 'output' must be a string, got null"):
        load_records(DataConfig(path=str(path)), seed=0)
    rows[3]["output"] = 4  # a column that mixes strings and numbers
    write_jsonl(path, rows)
    with pytest.raises(DataError, match=r"train\.jsonl line 4: 'output' must be a string, got int 4"):
        load_records(DataConfig(path=str(path)), seed=0)
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": ["x"], "output": "c"}]))
    with pytest.raises(DataError, match=r"train\.json row 2 of the array: 'instruction' must be a string, got list"):
        load_records(DataConfig(path=str(path)), seed=0)


def test_missing_csv_column_names_column_found_columns_and_setting(tmp_path):
    path = write_csv(tmp_path / "train.csv", [{"prompt": "a", "answer": "b"}], header=("prompt", "answer"))
    with pytest.raises(DataError) as err:
        load_records(DataConfig(path=str(path)), seed=0)
    msg = str(err.value)
    assert "train.csv" in msg and "missing column 'instruction'" in msg
    assert "columns found: prompt, answer" in msg and "data.columns.instruction" in msg


def test_csv_extra_cells_and_multiline_cells_give_the_right_line(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('instruction,input,output\n"two\nlines",,ok\nx,,\n')
    with pytest.raises(DataError, match=r"train\.csv line 4 \(row 2\): 'output' must be a string, got an empty cell"):
        load_records(DataConfig(path=str(path)), seed=0)
    path.write_text("instruction,input,output\na,b,c\nd,e,f,g\n")
    with pytest.raises(DataError, match=r"train\.csv line 3: expected 3 cells \(instruction, input, output\), found 4"):
        load_records(DataConfig(path=str(path)), seed=0)


def test_mixed_json_types_keep_strings_exact(tmp_path):
    # Turns with different keys come back as datasets.Json; answers that look like JSON must stay strings.
    rows = [{"messages": [{"role": "user", "content": "2+2?", "name": "ann"}, {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "[1]"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = DataConfig(path=str(path), format="messages")
    train, _ = load_records(cfg, seed=0)
    assert [format_example(r, cfg, None)[1] for r in train] == ["4", "[1]"]
    assert train[0]["messages"][0] == {"role": "user", "content": "2+2?"}


@pytest.mark.parametrize("content", ["", "\n\n", "[]", "instruction,input,output\n"])
def test_empty_file_is_named(tmp_path, content):
    path = tmp_path / ("train.csv" if content.startswith("instruction") else
                       "train.json" if content == "[]" else "train.jsonl")
    path.write_text(content)
    with pytest.raises(DataError, match=rf"{path.name}: .*(empty)"):
        load_records(DataConfig(path=str(path)), seed=0)


def test_bad_messages_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(DataError, match=r"chat\.jsonl line 2: 'messages' must end with an assistant turn"):
        load_records(DataConfig(path=str(path), format="messages"), seed=0)
    write_jsonl(path, [{"messages": [{"role": "human", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataError, match=r"line 1: 'messages' turn 1: role must be one of system, user, assistant"):
        load_records(DataConfig(path=str(path), format="messages"), seed=0)


def test_sharegpt_rows_load_as_the_same_messages_and_bad_ones_name_line_and_turn(tmp_path):
    speaker = {"system": "system", "user": "human", "assistant": "gpt"}
    share, chat = tmp_path / "share.jsonl", tmp_path / "chat.jsonl"
    write_jsonl(share, [{"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in CHAT],
                         "id": "a1"}])
    write_jsonl(chat, [{"messages": CHAT}])
    rows, _ = load_records(DataConfig(path=str(share), format="sharegpt"), seed=0)
    expected, _ = load_records(DataConfig(path=str(chat), format="messages"), seed=0)
    assert rows.column_names == ["messages"] and list(rows) == list(expected)
    write_jsonl(share, [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
                        {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}]}])
    with pytest.raises(DataError, match=r"share\.jsonl line 2: 'conversations' turn 2: from must be one of system, "
                                        r"human, user, gpt, assistant, chatgpt, got str 'robot'"):
        load_records(DataConfig(path=str(share), format="sharegpt"), seed=0)
    write_jsonl(share, [{"conversations": [{"from": "gpt", "value": "yo"}, {"from": "human", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"line 1: 'conversations' must end with a gpt turn"):
        load_records(DataConfig(path=str(share), format="sharegpt"), seed=0)


def test_a_hub_dataset_is_read_with_its_subset_and_split(monkeypatch):
    asked = {}

    def fake_load_dataset(name, subset=None, split=None):  # no hub here: what load_records asks for, answered
        asked.update(name=name, subset=subset, split=split)
        return datasets.Dataset.from_list([{"question": "2+2?", "answer": "4"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = DataConfig(path="openai/gsm8k", subset="main", split="test",
                     columns={"instruction": "question", "output": "answer"})
    rows, _ = load_records(cfg, seed=0)
    assert asked == {"name": "openai/gsm8k", "subset": "main", "split": "test"} and rows[0]["answer"] == "4"


def test_missing_local_path_and_unreachable_hub_dataset(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"data\.path: .*nope\.jsonl does not exist"):
        load_records(DataConfig(path=str(tmp_path / "nope.jsonl")), seed=0)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no network here: fail at once, no retries
    with pytest.raises(DataError, match=r"could not load dataset 'someone/no-such-set'.*Local paths must exist"):
        load_records(DataConfig(path="someone/no-such-set"), seed=0)


# --------------------------------------------------------------------------------------------------- formats
def test_alpaca_format_with_and_without_input():
    cfg = DataConfig(path="x.jsonl")
    with_input = {"instruction": "Translate.", "input": "cat", "output": "chat"}
    assert format_example(with_input, cfg, None) == (
        "### Instruction:\nTranslate.\n\n### Input:\ncat\n\n### Response:\n", "chat")
    for blank in ("", "  ", None, float("nan")):
        prompt, _ = format_example({**with_input, "input": blank}, cfg, None)
        assert prompt == "### Instruction:\nTranslate.\n\n### Response:\n"


def test_messages_builtin_template_and_text_format():
    cfg = DataConfig(path="x.jsonl", format="messages")
    prompt, response = format_example({"messages": CHAT}, cfg, None)
    assert prompt == ("<|system|>\nBe brief.\n<|user|>\nHi there\n<|assistant|>\nHello!\n"
                      "<|user|>\nWhat is 3+4?\n<|assistant|>\n")
    assert response == "7"
    assert format_example({"text": "plain"}, DataConfig(path="x.jsonl", format="text"), None) == ("", "plain")


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    tokenizer.chat_template = TEMPLATE
    cfg = DataConfig(path="x.jsonl", format="messages")
    prompt, response = format_example({"messages": CHAT}, cfg, tokenizer)
    assert prompt == ("[system]: Be brief.\n[user]: Hi there\n[assistant]: Hello!</s>\n[user]: What is 3+4?\n"
                      "[assistant]: ")
    assert response == "7"
    (example,) = tokenize_rows([{"messages": CHAT}], cfg, tokenizer)
    assert trained_spans(example, tokenizer) == ["Hello!", "7</s>"]  # both assistant turns, nothing else


def test_record_texts_are_full_examples():
    cfg = DataConfig(path="x.jsonl")
    texts = list(record_texts(ALPACA_ROWS[:2], cfg))
    assert texts[1] == ALPACA_PROMPT.format(instruction="Translate to French.", input="cat") + "chat"


# --------------------------------------------------------------------------------------------------- tokens
def test_labels_mask_exactly_the_prompt(tokenizer):
    cfg = DataConfig(path="x.jsonl")
    examples = tokenize_rows(ALPACA_ROWS, cfg, tokenizer)
    assert len(examples) == len(ALPACA_ROWS)
    for row, ex in zip(ALPACA_ROWS, examples):
        prompt, response = format_example(row, cfg, tokenizer)
        assert len(ex["input_ids"]) == len(ex["labels"])
        assert ex["input_ids"][0] == tokenizer.bos_token_id and ex["input_ids"][-1] == tokenizer.eos_token_id
        assert trained_text(ex, tokenizer) == response + "</s>"
        n_masked = ex["labels"].index(next(lab for lab in ex["labels"] if lab != IGNORE_INDEX))
        assert ex["input_ids"][:n_masked] == prompt_ids(prompt, tokenizer)  # what generation will be fed
        assert all(lab == IGNORE_INDEX for lab in ex["labels"][:n_masked])
        assert ex["labels"][n_masked:] == ex["input_ids"][n_masked:]


def test_train_on_prompt_and_text_format_train_everything_but_bos(tokenizer):
    for cfg, rows in ((DataConfig(path="x.jsonl", train_on_prompt=True), ALPACA_ROWS[:1]),
                      (DataConfig(path="x.jsonl", format="text"), [{"text": "Hello! Be brief."}])):
        (ex,) = tokenize_rows(rows, cfg, tokenizer)
        assert ex["labels"][0] == IGNORE_INDEX and ex["labels"][1:] == ex["input_ids"][1:]
    (ex,) = tokenize_rows(ALPACA_ROWS[:1], DataConfig(path="x.jsonl", train_on_prompt=True), tokenizer,
                          train_on_prompt=False)  # the argument overrides the config
    assert trained_text(ex, tokenizer) == "4</s>"


def test_multi_turn_trains_every_assistant_turn_builtin_template(tokenizer):
    cfg = DataConfig(path="x.jsonl", format="messages")
    (ex,) = tokenize_rows([{"messages": CHAT}], cfg, tokenizer)
    assert trained_spans(ex, tokenizer) == ["Hello!", "7</s>"]
    masked = tokenizer.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab == IGNORE_INDEX])
    assert "Be brief." in masked and "What is 3+4?" in masked and "Hello!" not in masked


def test_truncation_keeps_the_start_and_drops_examples_without_response(tokenizer):
    long_prompt = {"instruction": "Name a color. " * 30, "input": "", "output": "blue"}
    long_answer = {"instruction": "Say", "input": "", "output": "blue cat chat " * 30}
    cfg = DataConfig(path="x.jsonl", max_length=24)
    full = tokenize_rows([long_answer], DataConfig(path="x.jsonl", max_length=4096), tokenizer)[0]
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 examples"):
        examples = tokenize_rows([long_prompt, ALPACA_ROWS[0], long_answer], cfg, tokenizer)
    assert len(examples) == 2
    assert examples[1]["input_ids"] == full["input_ids"][:24] and examples[1]["labels"] == full["labels"][:24]
    assert any(lab != IGNORE_INDEX for lab in examples[1]["labels"])
    with pytest.raises(DataError, match="every one of the 1 examples"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenize_rows([long_prompt], cfg, tokenizer)


def test_packing_collates_padding_free_with_per_example_positions(tokenizer):
    examples = tokenize_rows(ALPACA_ROWS, DataConfig(path="x.jsonl", max_length=32, packing=True), tokenizer)
    assert examples == tokenize_rows(ALPACA_ROWS, DataConfig(path="x.jsonl", max_length=32), tokenizer)
    packed, padded = collate(examples, pad_id=0, packed=True), collate(examples, pad_id=0)
    lengths = [len(e["input_ids"]) for e in examples]
    assert packed["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in packed
    assert packed["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]
    assert packed["input_ids"][0].tolist() == [t for e in examples for t in e["input_ids"]]
    starts = [sum(lengths[:k]) for k in range(len(lengths))]
    assert all(packed["labels"][0, s] == IGNORE_INDEX for s in starts)  # nothing of an example precedes its start
    supervised = lambda labels: int((labels[:, 1:] != IGNORE_INDEX).sum())  # noqa: E731 - after the model's shift
    assert supervised(packed["labels"]) == supervised(padded["labels"]) > 0


# --------------------------------------------------------------------------------------------------- batches
def test_collate_right_pads_with_mask():
    out = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in out.values())


def test_batches_are_deterministic_per_seed_and_epoch_and_cover_everything():
    examples = [{"input_ids": [i] * (1 + i % 3), "labels": [i] * (1 + i % 3)} for i in range(10)]
    firsts = lambda seed, epoch, **kw: [b["input_ids"][:, 0].tolist()  # noqa: E731
                                        for b in batches(examples, 3, seed, epoch, pad_id=0, **kw)]
    epoch0 = firsts(7, 0)
    assert len(epoch0) == num_batches(10, 3) == 4 and [len(b) for b in epoch0] == [3, 3, 3, 1]
    assert sorted(i for b in epoch0 for i in b) == list(range(10))
    assert firsts(7, 0) == epoch0 and firsts(7, 1) != epoch0 and firsts(8, 0) != epoch0
    assert firsts(7, 0, skip=2) == epoch0[2:]  # resume mid-epoch
    assert [i for b in firsts(7, 0, shuffle=False) for i in b] == list(range(10))


def test_eval_prompts_and_exact_match(tokenizer):
    cfg = DataConfig(path="x.jsonl", val_size=0.2, metric="exact_match")
    pairs = eval_prompts(ALPACA_ROWS, cfg, tokenizer, limit=2)
    assert pairs == [format_example(r, cfg, tokenizer) for r in ALPACA_ROWS[:2]]
    assert exact_match(" chat\n", "chat") and not exact_match("chats", "chat")
