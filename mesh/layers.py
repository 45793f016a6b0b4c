"""The one layer-range type used by sources, backends, the planner and the wire."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class LayerRange:
    """Half-open range of decoder layers ``[start, end)`` of a model with ``total`` layers."""

    start: int
    end: int
    total: int

    def __post_init__(self) -> None:
        if not (0 <= self.start < self.end <= self.total):
            raise ValueError(f"invalid layer range [{self.start}, {self.end}) of {self.total}")

    @classmethod
    def full(cls, total: int) -> "LayerRange":
        return cls(0, total, total)

    @property
    def is_first(self) -> bool:
        """The first shard owns the token embedding."""
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """The last shard owns the final norm and the output head."""
        return self.end == self.total

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"


def check_covering(ranges: list[LayerRange]) -> None:
    """Raise ValueError unless ``ranges`` run contiguously from the first layer to the last."""
    if not ranges or not ranges[0].is_first or not ranges[-1].is_last:
        raise ValueError("stages must cover the model from its first to its last layer")
    for a, b in zip(ranges, ranges[1:]):
        if a.end != b.start:
            raise ValueError(f"stages {a} and {b} are not contiguous")
