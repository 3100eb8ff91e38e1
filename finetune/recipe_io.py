"""Recipe text in and out: YAML reading (duplicate keys refused), ``a.b=c`` overrides, pydantic errors turned into
messages that name the dotted key (with a did-you-mean), and the field reference generated from the schema.

Kept apart from :mod:`.recipe` so the schema there reads top to bottom; functions here take the schema class as an
argument rather than importing it.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel

from .errors import RecipeError
from .paths import is_local_data

SECTIONS = ("model", "adapter", "data", "optimizer", "offload", "training", "output")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    mapping = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (it already appears above)", key_node.start_mark)
        mapping[key] = loader.construct_object(value_node, deep=deep)
    return mapping


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a recipe file into a dict; YAML syntax errors name the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"recipe file {path} does not exist"], source=str(path))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise RecipeError([f"{where}invalid YAML: {problem}"], source=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError([f"the top level must be a mapping of sections {list(SECTIONS)}, "
                           f"got {type(data).__name__}"], source=str(path))
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """``training.max_steps=50`` → (["training", "max_steps"], 50). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise RecipeError([f"override {item!r} must look like section.key=value (e.g. training.max_steps=50)"])
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError([f"override {item!r}: {key!r} is not a dotted key like training.max_steps"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` override in ``data`` (creating sections as needed)."""
    for item in overrides:
        parts, value = parse_override(item)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError([f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section"])
            node = child
        node[parts[-1]] = value
    return data


def _noise(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


def union_members(annotation: Any) -> dict[str, type[BaseModel]]:
    """Members of a tagged union (``optimizer`` by ``name``) keyed by tag; {} for anything else."""
    if typing.get_origin(annotation) is Annotated:
        return union_members(typing.get_args(annotation)[0])
    members = {}
    if typing.get_origin(annotation) in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if typing.get_origin(arg) is Annotated:
                cls, *meta = typing.get_args(arg)
                for m in meta:
                    if type(m).__name__ == "Tag":
                        members[m.tag] = cls
    return members


def resolve_loc(schema: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """(dotted location without pydantic's union tags, the section model holding its last key)."""
    model: Any = schema
    parent: Any = schema
    out: list = []
    parts = [p for p in loc if not _noise(p)]
    i = 0
    while i < len(parts):
        part = parts[i]
        out.append(part)
        parent = model
        field = model.model_fields.get(part) if (model is not None and isinstance(part, str)) else None
        if field is None:
            model = None
        elif (members := union_members(field.annotation)) and i + 1 < len(parts) and parts[i + 1] in members:
            model = members[parts[i + 1]]
            i += 1  # skip the tag: optimizer.galore.rank -> optimizer.rank
        else:
            model = section_type(field.annotation)
        i += 1
    return tuple(out), parent


def _siblings(schema: type[BaseModel], member: Any) -> dict[str, type[BaseModel]]:
    """The other members of the tagged union that ``member`` belongs to ({} if it belongs to none)."""
    for field in schema.model_fields.values():
        members = union_members(field.annotation)
        if any(m is member for m in members.values()):
            return {tag: m for tag, m in members.items() if m is not member}
    return {}


def section_type(annotation: Any) -> Any:
    """The pydantic section class inside a field annotation (``X | None`` -> ``X``), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = section_type(arg)
        if found is not None:
            return found
    return None


# Names users bring from other tools (HF Trainer, axolotl, LLaMA-Factory, peft, torchtune) -> slimtune's key.
KNOWN_ALIASES = {
    "lr": "training.learning_rate", "batch_size": "training.per_device_train_batch_size",
    "micro_batch_size": "training.per_device_train_batch_size", "num_epochs": "training.num_train_epochs",
    "epochs": "training.num_train_epochs", "lr_scheduler": "training.lr_scheduler_type",
    "grad_accum": "training.gradient_accumulation_steps", "sequence_len": "data.max_length",
    "max_seq_length": "data.max_length", "cutoff_len": "data.max_length", "max_seq_len": "data.max_length",
    "base_model": "model.name_or_path", "model_name_or_path": "model.name_or_path", "torch_dtype": "model.dtype",
    "lora_r": "adapter.r", "lora_rank": "adapter.r", "rank": "adapter.r", "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout", "lora_target_modules": "adapter.target_modules",
    "lora_target": "adapter.target_modules", "load_in_4bit": "model.load_in_4bit", "optim": "optimizer.name",
    "dataset": "data.path", "datasets": "data.path", "val_set_size": "data.val_size",
    "sample_packing": "data.packing", "output_dir": "output.output_dir", "save_steps": "output.save_steps",
    "logging_steps": "output.logging_steps", "report_to": "output.report_to",
    "save_total_limit": "output.save_total_limit", "warmup": "training.warmup_steps",
}


def format_error(schema: type[BaseModel], err: dict[str, Any]) -> str:
    """One pydantic error as a line naming the dotted key, the value and what is allowed."""
    loc, parent = resolve_loc(schema, tuple(err["loc"]))
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    kind, value = err["type"], err.get("input")
    if kind == "extra_forbidden":
        valid = list(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join(map(str, loc[:-1] + (close[0],)))}?" if close else ""
        owners = [tag for tag, member in _siblings(schema, parent).items() if loc[-1] in member.model_fields]
        if not close and owners:
            hint = f"; it is a setting of {loc[0]}.name {' / '.join(owners)}"
        elif not close and str(loc[-1]) in KNOWN_ALIASES:
            hint = f"; did you mean {KNOWN_ALIASES[str(loc[-1])]}?"
        return f"{dotted}: unknown key{hint} (valid keys here: {', '.join(valid)})"
    if kind == "missing":
        return f"{dotted}: required key is missing"
    if kind == "invalid_optimizer":
        got = value.get("name") if isinstance(value, dict) else value
        return f"{dotted}.name: {got!r} is not allowed; expected {err['msg'].split(' must be ')[-1]}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return f"{dotted}: {msg}" if loc else msg
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{dotted}: {value!r} is not allowed; expected one of {expected}"
    return f"{dotted}: {msg} (got {value!r})"


def dedupe_union_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A value failing a Union yields one error per member; keep one (the most specific) per location."""
    seen: dict[tuple, dict[str, Any]] = {}
    for err in errors:
        key = tuple(p for p in err["loc"] if not _noise(p))
        if key not in seen or err["type"] == "literal_error":
            seen[key] = err
    return list(seen.values())



def without_keys(schema: type[BaseModel], data: dict[str, Any], locs: list[tuple]) -> dict[str, Any]:
    """A deep copy of ``data`` with the leaves at ``locs`` removed (so their defaults apply)."""
    reduced = copy.deepcopy(data)
    for loc in locs:
        node, path = reduced, list(resolve_loc(schema, loc)[0])
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and path:
            node.pop(path[-1], None)
    return reduced



def schema_docs(schema: type[BaseModel]) -> str:
    """Every field with its type, default and doc, generated from the schema (feeds --help and the README)."""
    lines = ["Recipe reference (generated from the schema in slimtune.finetune.recipe)", ""]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = section_type(field.annotation)
            dotted = f"{prefix}{name}"
            members = union_members(field.annotation)
            if members:
                for tag, member in members.items():
                    lines.append(f"{dotted} (name: {tag}):  {(member.__doc__ or '').strip()}")
                    walk(member, dotted + ".")
                continue
            if sub is not None:
                lines.append(f"{dotted}:  {field.description or ''}")
                walk(sub, dotted + ".")
                continue
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            lines.append(f"  {dotted} ({_type_name(field.annotation)}; {default})  {field.description or ''}")

    walk(schema, "")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    """Readable type: 'int', 'float | None', "'lora' | 'qlora' | 'none'", 'list[str]'."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def check_local_files(recipe) -> list[str]:
    """Light checks for `slimtune validate`: local paths that look like files must exist."""
    problems = []
    for key, value in recipe.data.local_paths():
        if value and is_local_data(value) and not Path(value).exists():
            problems.append(f"{key}: {value} does not exist (a local .json/.jsonl/.csv/.parquet file or directory, "
                            "or a hub dataset name like tatsu-lab/alpaca)")
    ckpt = recipe.training.resume_from_checkpoint
    if isinstance(ckpt, str) and not Path(ckpt).exists():
        problems.append(f"training.resume_from_checkpoint: {ckpt} does not exist (use true for the latest "
                        "checkpoint in output.output_dir)")
    return problems

