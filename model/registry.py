"""Name -> class for the mixers. Blocks ask the registry; they never branch on mixer type."""

from __future__ import annotations

from hylas.configs.base import ConfigError
from hylas.model.attention import SoftmaxAttention
from hylas.model.linear_mixers import LINEAR_MIXERS, LinearMixer

__all__ = ["LINEAR_MIXERS", "check_linear_mixer", "mixer_class", "mixer_registry"]

# Linear mixers on the roadmap; naming one gives "not available yet" rather than "unknown".
PLANNED_LINEAR_MIXERS: tuple[str, ...] = ()


def check_linear_mixer(name: str) -> type[LinearMixer]:
    """The registered class for ``name``, or one sentence naming the choices."""
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
        return SoftmaxAttention
    return check_linear_mixer(linear_mixer)


def mixer_registry() -> dict[str, type[LinearMixer] | type[SoftmaxAttention]]:
    """Every mixer by name: the linear ones and ``attention`` (softmax, the ``F`` layers)."""
    return {**LINEAR_MIXERS, "attention": SoftmaxAttention}
