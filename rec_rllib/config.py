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

    def check_numbers(
        self, *, at_least: dict[str, float] | None = None, above: dict[str, float] | None = None
    ) -> None:
        """A ValueError naming the first field that is not a number ``>=`` its ``at_least`` bound or ``>`` its
        ``above`` bound (a value that would run nothing, hang, or fail deep inside a run)."""
        for bounds, ok, says in ((at_least, lambda v, b: v >= b, ">="), (above, lambda v, b: v > b, ">")):
            for name, bound in (bounds or {}).items():
                value = getattr(self, name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value, bound):
                    raise ValueError(f"{name} must be a number {says} {bound:g}, got {value!r}")
