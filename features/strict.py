"""A pydantic base for settings models: finite numbers only, and no booleans for numbers.

pydantic's lax mode reads `min_interval_s: true` as 1.0 and `session_cap: true` as 1, and a
float field takes `.nan` and `.inf` from YAML. Settings are safety limits and thresholds, so
both are errors here: every float (also inside tuples, lists and dicts) must be finite
(`allow_inf_nan=False`), and a boolean given where the field's type is a number is refused
with its key path. Integers stay accepted for floats (`min_interval_s: 2`).
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def bool_for_number(annotation: Any, value: Any) -> bool:  # noqa: PLR0911 -- one per type form
    """True if `value` holds a bool where `annotation` asks for an int or a float."""
    if annotation is bool or annotation is Any:
        return False
    if annotation in (int, float):
        return isinstance(value, bool)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return bool_for_number(args[0], value)
    if origin in (typing.Union, types.UnionType):
        if bool in args:  # a bool is one of the allowed types
            return False
        return any(bool_for_number(a, value) for a in args if a is not type(None))
    if origin in (tuple, list) and isinstance(value, list | tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return any(bool_for_number(a, v) for a, v in zip(args, value, strict=False))
        item = args[0] if args else Any
        return any(bool_for_number(item, v) for v in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(bool_for_number(args[1], v) for v in value.values())
    return False


def refuse_bool_for_number(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """The body of a mode='before' field validator: ValueError for a bool given for a number."""
    field = model.model_fields.get(info.field_name or "")
    if field is not None and bool_for_number(field.annotation, value):
        raise ValueError("expected a number, got a boolean")
    return value


class FiniteModel(BaseModel):
    """Extra keys forbidden, floats finite. Models with a discriminator field (pydantic refuses
    a before-validator there) add `refuse_bool_for_number` on their number fields by name."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StrictNumbersModel(FiniteModel):
    """Extra keys forbidden, floats finite, no booleans where numbers are meant."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_bool_for_number(cls, value, info)
