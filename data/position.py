"""What a ``ShardStream`` records of its current epoch, to resume there: ``state_dict()["position"]``.

The main process keeps an ``_EpochRecord`` (samples handed out and found bad per shard, shard sizes,
items delivered per worker); on resume it hands the workers a ``_Position`` of what to skip. Sample
indices are kept as ``_Ranges``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class _Ranges:
    """A set of sample indices as sorted, disjoint half-open ranges ``[[a, b), ...]``.

    Samples handed out from a shard form a prefix with a few holes (those still in a shuffle buffer) and
    a few stragglers beyond; both stay short as ranges, bounded by the buffers, not by the shard size.
    """

    __slots__ = ("starts", "ends")

    def __init__(self, pairs: Iterable[Sequence[int]] = ()) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        for a, b in pairs:
            if not (isinstance(a, int) and isinstance(b, int) and 0 <= a < b):
                raise ValueError(f"index range must be [start, end) with 0 <= start < end, got {[a, b]}")
            if self.ends and a <= self.ends[-1]:  # touching ranges are stored merged
                raise ValueError(f"index ranges must be sorted and apart, got {[a, b]} after {self.ends[-1]}")
            self.starts.append(a)
            self.ends.append(b)

    def __contains__(self, index: int) -> bool:
        """Whether ``index`` is in the set (binary search over the range starts)."""
        j = bisect.bisect_right(self.starts, index) - 1
        return j >= 0 and index < self.ends[j]

    def __len__(self) -> int:
        """Number of indices in the set."""
        return sum(b - a for a, b in zip(self.starts, self.ends))

    def add(self, index: int) -> None:
        """Insert ``index``, merging it with neighbouring ranges."""
        j = bisect.bisect_right(self.starts, index) - 1
        if j >= 0 and index < self.ends[j]:
            return
        left = j >= 0 and self.ends[j] == index
        right = j + 1 < len(self.starts) and self.starts[j + 1] == index + 1
        if left and right:
            self.ends[j] = self.ends.pop(j + 1)
            del self.starts[j + 1]
        elif left:
            self.ends[j] = index + 1
        elif right:
            self.starts[j + 1] = index
        else:
            self.starts.insert(j + 1, index)
            self.ends.insert(j + 1, index + 1)

    def covers(self, n: int) -> bool:
        """Whether every index in ``[0, n)`` is in the set."""
        return n == 0 or (bool(self.starts) and self.starts[0] == 0 and self.ends[0] >= n)

    def to_list(self) -> list[list[int]]:
        """``[[start, end), ...]`` for JSON."""
        return [[a, b] for a, b in zip(self.starts, self.ends)]

    @classmethod
    def union(cls, *sets: _Ranges) -> _Ranges:
        """The indices in any of ``sets``."""
        pairs = sorted(p for s in sets for p in zip(s.starts, s.ends))
        merged: list[list[int]] = []
        for a, b in pairs:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return cls(merged)


@dataclass(frozen=True)
class _Position:
    """What the workers of a resumed epoch must skip (picklable, built by the main process)."""

    epoch: int
    done: dict[int, list[list[int]]]  # source -> ranges of samples handed out or found bad
    sizes: dict[int, int]  # source -> its number of samples, for sources read to their end
    skip_items: tuple[int, ...]  # per worker: leading items already delivered (same layout only)


@dataclass
class _EpochRecord:
    """The main process's account of the current epoch, saved in ``state_dict()["position"]``."""

    num_workers: int
    consumed: dict[int, _Ranges] = field(default_factory=dict)  # source -> samples handed out
    bad: dict[int, _Ranges] = field(default_factory=dict)  # source -> samples found bad (counted)
    sizes: dict[int, int] = field(default_factory=dict)  # source -> samples in it (read to the end)
    items: list[int] = field(default_factory=list)  # per worker: leading items fully handed out
    pending: dict[int, int] = field(default_factory=dict)  # worker -> samples of its final item not out yet

    def __post_init__(self) -> None:
        """Start every worker's item count at zero unless given."""
        self.items = self.items or [0] * self.num_workers

    def hand_out(self, source: int, index: int) -> None:
        """Record that sample ``index`` of ``source`` went to the trainer."""
        self.consumed.setdefault(source, _Ranges()).add(index)

    def final_sample_out(self, worker: int) -> None:
        """One more sample of ``worker``'s final item went out; the item counts once all have."""
        self.pending[worker] -= 1
        if self.pending[worker] == 0:
            del self.pending[worker]
            self.items[worker] += 1

    def to_state(self) -> dict[str, list]:
        """``{"sources": [[source, size or -1, handed-out ranges, bad ranges], ...], "worker_items"}``."""
        sources = sorted(set(self.consumed) | set(self.bad) | set(self.sizes))
        return {
            "sources": [
                [
                    s,
                    self.sizes.get(s, -1),
                    self.consumed.get(s, _Ranges()).to_list(),
                    self.bad.get(s, _Ranges()).to_list(),
                ]
                for s in sources
            ],
            "worker_items": list(self.items),
        }

    @classmethod
    def from_state(cls, position: dict, num_workers: int, same_layout: bool) -> _EpochRecord:
        """Rebuild from ``to_state()``; worker item counts only carry over to the same worker layout."""
        record = cls(num_workers)
        try:
            for source, size, consumed, bad in position["sources"]:
                if size >= 0:
                    record.sizes[int(source)] = int(size)
                if consumed:
                    record.consumed[int(source)] = _Ranges(consumed)
                if bad:
                    record.bad[int(source)] = _Ranges(bad)
            items = [int(n) for n in position["worker_items"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"stream state has a malformed 'position': {exc}") from exc
        if same_layout and len(items) == num_workers:
            record.items = items
        return record

    def position(self, epoch: int) -> _Position:
        """What the workers must skip in ``epoch``: handed-out and bad samples alike."""
        done = {
            s: _Ranges.union(self.consumed.get(s, _Ranges()), self.bad.get(s, _Ranges())).to_list()
            for s in set(self.consumed) | set(self.bad)
        }
        return _Position(epoch, done, dict(self.sizes), tuple(self.items))
