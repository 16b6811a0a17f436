"""The one way settings dataclasses are read from and written to plain dicts (YAML, JSON, RLlib configs)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="DictConfig")


class DictConfig:
    """Mixin for settings dataclasses: strict ``from_dict`` (unknown keys are named) and ``to_dict``."""

    config_label: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.config_label} keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
