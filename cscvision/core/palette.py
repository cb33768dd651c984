"""The one default palette: colours of targets that the model card does not colour itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

RGB = tuple[int, int, int]

# The two targets' colours everywhere (card, overlay, GeoJSON): red and blue stay apart for
# the common red-green colour blindness.
TARGET_COLORS: dict[str, RGB] = {"stemness": (220, 50, 47), "immunosuppressive": (38, 139, 210)}
# Other targets, by position among the model's targets.
CYCLE: tuple[RGB, ...] = ((220, 50, 47), (38, 139, 210), (30, 160, 60), (230, 150, 0))


def target_colors(
    targets: Sequence[str], colors: Mapping[str, Sequence[int]] | None = None
) -> dict[str, RGB]:
    """Colour per target: the card's where it has one, else the default for that name, else
    the cycle by position."""
    colors = colors or {}
    out: dict[str, RGB] = {}
    for i, t in enumerate(targets):
        rgb = colors.get(t) or TARGET_COLORS.get(t) or CYCLE[i % len(CYCLE)]
        out[t] = tuple(int(c) for c in rgb)  # type: ignore[assignment]
    return out
