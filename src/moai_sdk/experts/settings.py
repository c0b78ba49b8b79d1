"""Typed expert settings: the Pydantic base model and the value types the experts share.

Every built-in expert declares its options as a subclass of :class:`ExpertSettings` (``Expert.Settings``), so a
threshold, a size or a backend name is checked once, by one rule, when the expert is built; a bad value raises
:class:`~moai_sdk.errors.ConfigError` naming the setting (:func:`validate_settings`). Experts written with a plain
``default_settings`` dict get a model derived from it (any value type, no unknown keys).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, create_model

from ..errors import ConfigError

#: A probability or threshold: a number (not a bool, not a string) in [0, 1].
UnitFloat = Annotated[float, Strict(), Field(ge=0.0, le=1.0)]
#: A count or size: an integer (not a bool, not a float) >= 1.
PositiveInt = Annotated[int, Strict(), Field(ge=1)]
#: A positive integer, or None for "no limit" / "the backend's default".
OptionalPositiveInt = Optional[PositiveInt]
#: Image-processor implementation: ``"pil"`` (the reference one the official code ran) or ``"torchvision"``.
ImageBackend = Literal["pil", "torchvision"]
#: Channel order handed to an engine that reads numpy images.
ChannelOrder = Literal["rgb", "bgr"]


class ExpertSettings(BaseModel):
    """Base of the per-expert settings models: unknown keys are refused, defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, arbitrary_types_allowed=True)


class OpenSettings(BaseModel):
    """Settings of an expert that declares none: any keyword is kept as given (the historical behaviour)."""

    model_config = ConfigDict(extra="allow")


_DERIVED: dict[type, type[BaseModel]] = {}


def settings_from_defaults(owner: type, defaults: Mapping[str, Any]) -> type[BaseModel]:
    """A settings model for an expert class that only gives a ``default_settings`` dict (cached per class).

    Each key becomes a field of any type with its default; an empty dict gives :class:`OpenSettings`.
    """
    model = _DERIVED.get(owner)
    if model is None:
        if not defaults:
            model = OpenSettings
        else:
            fields: dict[str, Any] = {key: (Any, value) for key, value in defaults.items()}
            model = create_model(f"{owner.__name__}Settings", __base__=ExpertSettings, **fields)
        _DERIVED[owner] = model
    return model


def validate_settings(expert_name: str, model: type[BaseModel], values: Mapping[str, Any]) -> BaseModel:
    """``model(**values)``; a :class:`ConfigError` that names the expert and each bad setting otherwise."""
    try:
        return model(**values)
    except ValidationError as exc:
        raise settings_error(expert_name, model, exc) from None


def settings_error(expert_name: str, model: type[BaseModel], exc: ValidationError) -> ConfigError:
    """A readable :class:`ConfigError` from a settings :class:`ValidationError` (unknown keys listed first)."""
    errors = exc.errors(include_url=False)
    unknown = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden" and e["loc"])
    if unknown:
        return ConfigError(
            f"expert {expert_name!r} has no setting(s) {unknown}; known settings: {sorted(model.model_fields)}"
        )
    parts = []
    for err in errors:
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        message = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"setting {field!r}: {message}; got {err.get('input')!r}")
    return ConfigError(f"expert {expert_name!r}: " + "; ".join(parts))


__all__ = [
    "ExpertSettings",
    "OpenSettings",
    "UnitFloat",
    "PositiveInt",
    "OptionalPositiveInt",
    "ImageBackend",
    "ChannelOrder",
    "settings_from_defaults",
    "validate_settings",
    "settings_error",
]
