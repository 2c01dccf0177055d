"""The dict round trip of a model config dataclass that mirrors a diffusers ``config.json``."""
from __future__ import annotations

import dataclasses
from typing import ClassVar


class DiffusersConfig:
    """Mixin for config dataclasses with an ``extra`` dict field and a ``patch_size`` tuple:
    ``from_dict`` keeps unknown keys in ``extra``; ``to_dict`` writes diffusers' ``config.json``."""

    CLASS_NAME: ClassVar[str]

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        if "patch_size" in kwargs:
            kwargs["patch_size"] = tuple(kwargs["patch_size"])
        extra = {k: v for k, v in d.items() if k not in names and not k.startswith("_")}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["patch_size"] = list(self.patch_size)
        return {"_class_name": self.CLASS_NAME, **d}
