"""The dataset type that relreason's data functions accept: anything indexable with a length."""

from __future__ import annotations

from typing import Any, Protocol


class SizedDataset(Protocol):
    """A map-style dataset: ``len(dataset)`` items, ``dataset[i]`` one of them (e.g. ``(image, label)``).

    torch's ``Dataset`` declares no ``__len__``; every dataset these functions read needs one.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...
