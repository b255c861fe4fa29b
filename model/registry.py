"""Name -> class for the mixers. Blocks ask the registry; they never branch on mixer type."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from hylas.model.config import ConfigError

if TYPE_CHECKING:
    from hylas.model.attention import SoftmaxAttention
    from hylas.model.linear_mixers import LinearMixer

M = TypeVar("M", bound="LinearMixer")

LINEAR_MIXERS: dict[str, type[LinearMixer]] = {}

# Linear mixers on the roadmap; naming one gives "not available yet" rather than "unknown".
PLANNED_LINEAR_MIXERS: tuple[str, ...] = ()


def register_linear_mixer(name: str) -> Callable[[type[M]], type[M]]:
    def add(cls: type[M]) -> type[M]:
        LINEAR_MIXERS[name] = cls
        return cls

    return add


def check_linear_mixer(name: str) -> type[LinearMixer]:
    """The registered class for ``name``, or one sentence naming the choices."""
    import hylas.model.linear_mixers  # noqa: F401  (fills the registry)

    if name in LINEAR_MIXERS:
        return LINEAR_MIXERS[name]
    if name in PLANNED_LINEAR_MIXERS:
        raise ConfigError(
            f"model.linear_mixer={name!r} is not available yet in this version of Hylas; "
            f"available: {', '.join(sorted(LINEAR_MIXERS))}"
        )
    raise ConfigError(
        f"model.linear_mixer={name!r} is not a known linear mixer; "
        f"available: {', '.join(sorted(LINEAR_MIXERS))}"
    )


def mixer_class(kind: str, linear_mixer: str) -> type[LinearMixer] | type[SoftmaxAttention]:
    """The mixer class for a pattern letter: ``L`` the configured linear mixer, ``F`` softmax."""
    if kind == "F":
        from hylas.model.attention import SoftmaxAttention

        return SoftmaxAttention
    return check_linear_mixer(linear_mixer)


def mixer_registry() -> dict[str, type[LinearMixer] | type[SoftmaxAttention]]:
    """Every mixer by name: the linear ones and ``attention`` (softmax, the ``F`` layers)."""
    from hylas.model.attention import SoftmaxAttention

    check_linear_mixer("gla")  # fills the registry
    return {**LINEAR_MIXERS, "attention": SoftmaxAttention}
