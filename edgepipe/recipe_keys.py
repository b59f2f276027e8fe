"""The recipe's key checking: every section refuses an unknown key, with the closest known one in the message."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict

from edgepipe import UserError
from edgepipe.runtime.names import did_you_mean


class RecipeError(UserError):
    pass


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def section_type(annotation) -> type | None:
    """The Section (or dataclass) inside an annotation (Section, Optional[Section], list[Section])."""
    if isinstance(annotation, type) and (issubclass(annotation, Section) or dataclasses.is_dataclass(annotation)):
        return annotation
    for arg in typing.get_args(annotation):
        found = section_type(arg)
        if found:
            return found
    return None


def fields_of(cls: type) -> dict[str, Any]:
    """Field name -> annotation of a Section or of a dataclass (the budgets, shared with the device install)."""
    if dataclasses.is_dataclass(cls):
        return typing.get_type_hints(cls)
    return {name: f.annotation for name, f in cls.model_fields.items()}


def check_keys(data: Any, cls: type, where: str) -> None:
    if isinstance(data, list):
        for i, item in enumerate(data):
            check_keys(item, cls, f"{where}[{i}]")
        return
    if not isinstance(data, dict):
        return
    fields = fields_of(cls)
    for key, value in data.items():
        if key not in fields:
            hint = did_you_mean(key, fields, cutoff=0.5, otherwise=f"; allowed: {', '.join(fields)}")
            raise RecipeError(f"unknown key '{where + '.' if where else ''}{key}'{hint}")
        sub = section_type(fields[key])
        if sub is not None:
            check_keys(value, sub, f"{where + '.' if where else ''}{key}")
