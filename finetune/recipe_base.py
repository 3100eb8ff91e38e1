"""Building blocks shared by the recipe's sections (kept apart so section modules can import them)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def _dtype_alias(value: Any) -> Any:
    return _DTYPE_ALIASES.get(value, value) if isinstance(value, str) else value


DType = Annotated[Literal["float32", "bfloat16", "float16"], BeforeValidator(_dtype_alias)]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)
