"""Training data: files or hub datasets → validated rows (tokens: finetune/tokens.py; batches: finetune/batches.py).

Loading goes through `datasets` (``load_dataset('json'|'csv'|'parquet')`` for local files, ``load_dataset(name)``
for the hub, ``streaming=True`` for :func:`open_stream`). Each local file is loaded and validated on its own, so every
problem is reported with the file and its line (JSON Lines, CSV) or row (JSON array, Parquet, hub) and what was
expected; the files of a directory are then concatenated. Only the columns the format uses are kept.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator

import datasets

from .errors import DataError
from .paths import is_local_data
from .recipe import DataConfig
from .templates import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    CHAT_GENERATION_PROMPT,
    CHAT_TURN,
    ROLES,
    format_example,
    is_blank,
)

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "CHAT_TURN", "CHAT_GENERATION_PROMPT", "load_records",
           "record_texts", "format_example", "validated_stream", "open_stream", "eval_prompts", "exact_match",
           "loaded_format", "SHAREGPT_ROLES"]

_TURNS = datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")})
_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # paths.DATA_SUFFIXES


# --------------------------------------------------------------------------------------------------- loading
def load_records(cfg: DataConfig, seed: int, key: str = "data.path"
                 ) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train rows, eval rows or None), every row validated against ``cfg.format`` and ``cfg.columns``.

    Eval rows come from ``cfg.eval_path`` when set, else ``cfg.val_size`` rows (a fraction in (0, 1) or a count)
    are split off with a shuffle seeded by ``seed``. ``cfg.max_samples`` caps the training rows after that split,
    so the eval rows do not depend on it. ``key``: the recipe key that names ``cfg.path`` in errors.
    """
    rows = _load(cfg.path, cfg, key)
    eval_rows = None
    if cfg.eval_path:
        if cfg.val_size:
            warnings.warn(f"data.eval_path is set, so data.val_size {cfg.val_size:g} is ignored", stacklevel=2)
        eval_rows = _load(cfg.eval_path, cfg, "data.eval_path")
    elif cfg.val_size:
        n, test_size = len(rows), cfg.val_size if cfg.val_size < 1 else int(cfg.val_size)
        n_eval = math.ceil(test_size * n) if isinstance(test_size, float) else test_size
        if n - n_eval < 1:
            raise DataError(f"{cfg.path}: data.val_size {cfg.val_size:g} takes {n_eval} of its {n} rows for eval, "
                            "leaving none to train on; lower data.val_size or add rows")
        split = rows.train_test_split(test_size=test_size, shuffle=True, seed=seed)
        rows, eval_rows = split["train"], split["test"]
    if cfg.max_samples is not None and cfg.max_samples < len(rows):
        rows = rows.select(range(cfg.max_samples))
    return rows, eval_rows


# ShareGPT's speakers (``from``) -> chat roles. Its conversations become ``messages`` rows when loaded.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
_FIELD = {"alpaca": None, "messages": "messages", "sharegpt": "conversations", "text": "text"}


def _columns(cfg: DataConfig) -> dict[str, bool]:
    """Column field name → required, for the configured format."""
    if cfg.format == "alpaca":
        return {"instruction": True, "input": False, "output": True}
    return {_FIELD[cfg.format]: True}


def loaded_format(cfg: DataConfig) -> DataConfig:
    """The data config that describes rows as :func:`load_records` returns them: sharegpt rows are messages rows
    by then (their turns in ``data.columns.messages``)."""
    return cfg.model_copy(update={"format": "messages"}) if cfg.format == "sharegpt" else cfg


def _names(cfg: DataConfig) -> dict[str, str]:
    """Column field name → the column's name in the data (``data.columns``)."""
    return {field: getattr(cfg.columns, field) for field in _columns(cfg)}


def _load(path_str: str, cfg: DataConfig, key: str) -> datasets.Dataset:
    path = Path(path_str).expanduser()
    if not path.exists():
        _check_not_local(path_str, key)
        return _load_hub(path_str, cfg, key)
    if path.is_dir():
        files = _files_in(path, key)
        parts = [_load_file(f, cfg, _section(key)) for f in files]
        try:
            return datasets.concatenate_datasets(parts)
        except ValueError as exc:
            described = "; ".join(f"{f.name}: {dict(p.features)}" for f, p in zip(files, parts))
            raise DataError(f"{key}: the files in {path_str} have different column types and cannot be "
                            f"combined ({described})") from exc
    if path.suffix.lower() not in _BUILDERS:
        raise DataError(f"{key}: {path_str} is not a .jsonl, .json, .csv or .parquet file")
    return _load_file(path, cfg, _section(key))


def _check_not_local(path_str: str, key: str) -> None:
    """A path that does not exist is a hub dataset name, unless it looks like a local path."""
    if is_local_data(path_str):
        raise DataError(f"{key}: {path_str} does not exist (a local .jsonl/.json/.csv/.parquet file or directory of "
                        "them, or a hub dataset name like tatsu-lab/alpaca)")


def _files_in(directory: Path, key: str) -> list[Path]:
    """The data files of a directory, sorted by name (an error when there is none)."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _BUILDERS)
    if not files:
        found = ", ".join(sorted(p.name for p in directory.iterdir())[:10]) or "nothing"
        raise DataError(f"{key}: directory {directory} holds no .jsonl/.json/.csv/.parquet files (found: {found})")
    return files


def _hub_reason(exc: Exception) -> str:
    """The first line of a hub failure (offline, unknown name, missing split or subset, gated repo)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _csv_kwargs(path: Path) -> dict:
    """``load_dataset('csv')`` settings: every cell a string, and only an empty cell missing (otherwise pandas turns
    the answer "4" into 4 and "None", "NA" or "null" into NaN); index_col=False: never take the first column as a
    row index. Checks the file's records first (:func:`_check_csv`)."""
    return dict(features=datasets.Features({c: datasets.Value("string") for c in _check_csv(path)}),
                keep_default_na=False, na_values=[""], index_col=False)


def open_stream(cfg: DataConfig, key: str = "data.path") -> datasets.IterableDataset:
    """``cfg.path`` as a stream (``data.streaming``: ``load_dataset(..., streaming=True)``): rows are read when the
    trainer reaches them, from local files or the hub, never all in memory or on disk. Each row is validated as it
    is read (:func:`validated_stream`): an invalid row stops the run with its file and line when it is reached."""
    path = Path(cfg.path).expanduser()
    if not path.exists():
        _check_not_local(cfg.path, key)
        subset = f", subset {cfg.subset!r}" if cfg.subset else ""
        try:
            rows = datasets.load_dataset(cfg.path, cfg.subset, split=cfg.split, streaming=True)
        except Exception as exc:
            raise DataError(f"{key}: could not stream dataset {cfg.path!r} (split {cfg.split!r}{subset}) from the "
                            f"Hugging Face hub ({_hub_reason(exc)})") from exc
        return validated_stream(rows, cfg, _RowLocator(f"dataset {cfg.path}"))
    files = _files_in(path, key) if path.is_dir() else [path]
    builders = {_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders or len(builders) > 1:
        raise DataError(f"{key}: {cfg.path} must be a .jsonl/.json/.csv/.parquet file or a directory of files of "
                        f"one of those types to stream (found: {', '.join(f.name for f in files[:10])})")
    builder = builders.pop()
    kwargs = _csv_kwargs(files[0]) if builder == "csv" else {}
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    rows = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True,
                                 **kwargs)
    where = _locator(files[0], builder) if len(files) == 1 else _RowLocator(f"{key} {cfg.path}")
    return validated_stream(rows, cfg, where)


def validated_stream(rows: datasets.IterableDataset, cfg: DataConfig, where: Callable[[int], str]
                     ) -> datasets.IterableDataset:
    """The stream with each row checked as it is read (``where(i)`` names row i in the error) and ShareGPT turns
    turned into ``messages`` turns; rows keep their other columns."""
    names = _names(cfg)

    def check(row: dict, i: int) -> dict:
        problem = _row_problem(row, cfg, names, "null")
        if problem:
            raise DataError(f"{where(i)}: {problem}")
        return {cfg.columns.messages: _sharegpt_turns(row[names["conversations"]])} if cfg.format == "sharegpt" else {}

    return rows.map(check, with_indices=True)


def _load_hub(name: str, cfg: DataConfig, key: str) -> datasets.Dataset:
    subset = f", subset {cfg.subset!r}" if cfg.subset else ""
    try:
        rows = datasets.load_dataset(name, cfg.subset, split=cfg.split)
    except Exception as exc:  # offline, unknown name, missing split or subset, gated repo: all surface here
        raise DataError(f"{key}: could not load dataset {name!r} (split {cfg.split!r}{subset}) from the Hugging "
                        f"Face hub ({_hub_reason(exc)}). Local paths must exist: no file or directory {name} was found "
                        f"(from {Path.cwd()})") from exc
    return _validate(rows, cfg, f"dataset {name} (split {cfg.split}{subset})", _RowLocator(f"dataset {name}"),
                     section=_section(key))


def _load_file(path: Path, cfg: DataConfig, section: str = "data") -> datasets.Dataset:
    builder = _BUILDERS[path.suffix.lower()]
    if path.stat().st_size == 0 or (path.stat().st_size < 1 << 20 and not path.read_bytes().strip()):
        raise DataError(f"{path}: the file is empty")
    kwargs = _csv_kwargs(path) if builder == "csv" else {}
    # A local file: no download-count ping to the datasets bucket (datasets' HF_UPDATE_DOWNLOAD_COUNTS switch), so a
    # run on local data opens no network connection
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        rows = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except Exception as exc:
        if "corresponds to no data" in str(exc):  # datasets' words for a file without rows, e.g. "[]"
            raise DataError(f"{path}: no rows (the data is empty)") from exc
        problem = _find_json_problem(path) if builder == "json" else None
        cause = exc.__cause__ or exc
        raise DataError(problem or f"{path}: could not be read as {path.suffix.lstrip('.').upper()}: "
                                   f"{str(cause).strip().splitlines()[0] if str(cause).strip() else cause!r}"
                        ) from exc
    names = _names(cfg)
    if builder == "json" and any(_has_json(rows.features.get(c)) for c in names.values()):
        # A field that mixes types (strings and numbers, turns with different keys) comes back as datasets.Json,
        # whose decoding is lossy (the string "4" reads as the number 4): check and rebuild those rows from the
        # file itself.
        items = []
        problem = _find_json_problem(path, lambda item: items.append(item) or _row_problem(item, cfg, names, "null"))
        if problem:
            raise DataError(problem)
        rows = datasets.Dataset.from_list([{c: item.get(c) for c in names.values()} for item in items])
    return _validate(rows, cfg, str(path), _locator(path, builder), "an empty cell" if builder == "csv" else "null",
                     section)


def _has_json(feature) -> bool:
    if isinstance(feature, datasets.Json):
        return True
    if isinstance(feature, dict):
        return any(_has_json(f) for f in feature.values())
    return _has_json(getattr(feature, "feature", None)) if feature is not None else False


def _check_csv(path: Path) -> list[str]:
    """The header of a CSV file, after checking every record has one cell per header column (pandas would
    silently use an extra first cell as a row index) and that there is at least one record."""
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f)
        header, start, records = next(reader, []), reader.line_num + 1, 0
        for record in reader:
            if record and len(record) != len(header):
                raise DataError(f"{path} line {start}: expected {len(header)} cells ({', '.join(header)}), found "
                                f"{len(record)}; quote cells that contain commas")
            records += bool(record)
            start = reader.line_num + 1
    if not records:
        raise DataError(f"{path}: no rows below the header (the data is empty)")
    return header


def _find_json_problem(path: Path, check: Callable[[dict], str | None] = lambda item: None) -> str | None:
    """The first line of a .json/.jsonl file that is not a JSON object, or (with ``check``) not a valid row:
    datasets' own errors name no line."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg})"
        for i, item in enumerate(data):
            problem = check(item) if isinstance(item, dict) else f"expected a JSON object, got {_describe(item)}"
            if problem:
                return f"{path} row {i + 1} of the array: {problem}"
        return None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            return (f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno}); expected one JSON "
                    "object per line")
        problem = check(item) if isinstance(item, dict) else f"expected a JSON object, got {_describe(item)}"
        if problem:
            return f"{path} line {number}: {problem}"
    return None


class _RowLocator:
    """Names row i of a source: 'train.parquet row 3' (1-based)."""

    def __init__(self, name: str, suffix: str = ""):
        self.name, self.suffix = name, suffix

    def __call__(self, i: int) -> str:
        return f"{self.name} row {i + 1}{self.suffix}"


class _LineLocator:
    """Names row i of a line-based file by its 1-based line number (blank lines and the CSV header skipped).
    The file is only scanned when an error needs a location."""

    def __init__(self, path: Path, builder: str):
        self.path, self.builder = path, builder

    def __call__(self, i: int) -> str:
        with self.path.open(newline="" if self.builder == "csv" else None, encoding="utf-8",
                            errors="replace") as f:
            if self.builder == "csv":
                reader, row, previous_end = csv.reader(f), -1, 0
                for record in reader:  # a quoted cell may span lines: report the line the record starts on
                    start, previous_end = previous_end + 1, reader.line_num
                    if record and row == i:
                        return f"{self.path} line {start} (row {i + 1})"
                    row += bool(record)
            else:
                row = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        if row == i:
                            return f"{self.path} line {number}"
                        row += 1
        return f"{self.path} row {i + 1}"


def _locator(path: Path, builder: str) -> Callable[[int], str]:
    if builder == "csv":
        return _LineLocator(path, builder)
    if builder == "json":
        with path.open("rb") as f:
            is_array = f.read(4096).lstrip().startswith(b"[")
        return _RowLocator(str(path), " of the array") if is_array else _LineLocator(path, builder)
    return _RowLocator(str(path))


def _describe(value) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _section(key: str) -> str:
    """The recipe section a data key belongs to: 'data' for data.path, 'data.sources[1]' for a source's path."""
    return key.rsplit(".", 1)[0] if key.startswith("data.sources[") else "data"


def _validate(rows: datasets.Dataset, cfg: DataConfig, name: str, where: Callable[[int], str],
              empty: str = "null", section: str = "data") -> datasets.Dataset:
    """Check columns and every row; keep only the format's columns. ``empty`` names a missing value; ``section``
    the recipe keys that set the format and columns."""
    if len(rows) == 0:
        raise DataError(f"{name}: no rows (the data is empty)")
    wanted, names = _columns(cfg), _names(cfg)
    for field, required in wanted.items():
        if required and names[field] not in rows.column_names:
            found = ", ".join(rows.column_names)
            raise DataError(f"{name}: missing column '{names[field]}' (columns found: {found}; "
                            f"set {section}.columns.{field}, or check {section}.format {cfg.format})")
    if "input" in wanted and names["input"] not in rows.column_names:  # optional: absent = no input anywhere
        rows = rows.add_column(names["input"], [None] * len(rows))
    rows = rows.select_columns(list(names.values()))
    i = 0
    for batch in rows.iter(batch_size=1024):
        for j in range(len(batch[rows.column_names[0]])):
            problem = _row_problem({c: batch[c][j] for c in rows.column_names}, cfg, names, empty)
            if problem:
                raise DataError(f"{where(i)}: {problem}")
            i += 1
    if cfg.format == "sharegpt":
        col, target = names["conversations"], cfg.columns.messages
        return rows.map(lambda r: {target: _sharegpt_turns(r[col])}, remove_columns=[col],
                        features=datasets.Features({target: _TURNS}))
    if cfg.format == "messages" and rows.features[names["messages"]] != _TURNS:
        # Keep role and content only, so files whose turns carry different extra keys can be combined.
        col = names["messages"]
        rows = rows.map(lambda r: {col: [{"role": t["role"], "content": t["content"]} for t in r[col]]},
                        features=datasets.Features({col: _TURNS}))
    return rows


def _sharegpt_turns(turns: list[dict]) -> list[dict[str, str]]:
    """ShareGPT ``{from, value}`` turns as chat ``{role, content}`` turns."""
    return [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in turns]


def _row_problem(row: dict, cfg: DataConfig, names: dict[str, str], empty: str) -> str | None:
    def got(value) -> str:
        return empty if value is None else _describe(value)

    if cfg.format in ("alpaca", "text"):
        for field in ("instruction", "output") if cfg.format == "alpaca" else ("text",):
            if not isinstance(row.get(names[field]), str):
                return f"'{names[field]}' must be a string, got {got(row.get(names[field]))}"
        value = row.get(names.get("input", ""))
        if cfg.format == "alpaca" and not (isinstance(value, str) or is_blank(value)):
            return f"'{names['input']}' must be a string (or empty), got {got(value)}"
        return None
    if cfg.format == "sharegpt":
        return _turns_problem(row.get(names["conversations"]), names["conversations"], got, ("from", "value"),
                              SHAREGPT_ROLES, ("a gpt turn", "from "))
    return _turns_problem(row.get(names["messages"]), names["messages"], got, ("role", "content"),
                          {role: role for role in ROLES}, ("an assistant turn", ""))


def _turns_problem(turns, col: str, got: Callable, keys: tuple[str, str], speakers: dict[str, str],
                   last: tuple[str, str]) -> str | None:
    """What is wrong with a conversation (None: nothing): ``keys`` (speaker, text) name a turn's fields,
    ``speakers`` maps the valid speakers to chat roles, and the last turn must be the assistant's (``last``: how
    to say so)."""
    who, what = keys
    if not isinstance(turns, list) or not turns:
        return f"'{col}' must be a non-empty list of {{{who}, {what}}} turns, got {got(turns)}"
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict):
            return f"'{col}' turn {k + 1} must be an object with {who} and {what}, got {got(turn)}"
        if turn.get(who) not in speakers:
            present = ", ".join(key for key, v in turn.items() if v is not None)
            return (f"'{col}' turn {k + 1}: {who} must be one of {', '.join(speakers)}, got {got(turn.get(who))} "
                    f"(keys: {present})")
        if not isinstance(turn.get(what), str):
            return f"'{col}' turn {k + 1} ({turn[who]}): {what} must be a string, got {got(turn.get(what))}"
    if speakers[turns[-1][who]] != "assistant":
        return (f"'{col}' must end with {last[0]} (the response to learn); the last turn is {last[1]}"
                f"{turns[-1][who]!r}")
    return None


def record_texts(rows: Iterable[dict], cfg: DataConfig) -> Iterator[str]:
    """Full text (prompt + response, built-in chat template) of each row: training text for a new tokenizer."""
    for row in rows:
        prompt, response = format_example(row, cfg, None)
        yield prompt + response


# --------------------------------------------------------------------------------------------------- metric
def eval_prompts(rows: Iterable[dict], cfg: DataConfig, tokenizer, limit: int) -> list[tuple[str, str]]:
    """(prompt, reference response) of the first ``limit`` eval rows, for the exact-match metric."""
    if cfg.format == "text":
        raise ValueError("eval_prompts needs an instruction format (alpaca or messages): text has no references")
    pairs = []
    for row in rows:
        if len(pairs) >= limit:
            break
        pairs.append(format_example(row, cfg, tokenizer))
    return pairs


def exact_match(prediction: str, reference: str) -> bool:
    """Whitespace-stripped equality of a generated answer and the reference."""
    return prediction.strip() == reference.strip()
