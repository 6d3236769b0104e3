"""BPF maps the way the kernel keeps them: packed byte keys and values, a fixed max_entries.

Layer: core, sans-IO. The eBPF backend keeps every table in one of these, so a lookup is what a BPF
program's `map_lookup_elem` is (a hash probe on a packed key) and a full table fails the way the
kernel's does. Follows kernel/bpf/hashtab.c (HASH, LRU_HASH), kernel/bpf/lpm_trie.c (LPM_TRIE) and
the BPF_MAP_UPDATE_ELEM flags of include/uapi/linux/bpf.h.

Rules this module keeps
- A key or value of the wrong size is a programming error (`ValueError`, the syscall's EINVAL).
  The outer map of a map-in-map (value_size None) holds the inner map object itself.
- HASH: an update that would add an entry to a map holding max_entries entries fails with
  `MapFull` (htab_map_update_elem's -E2BIG) and changes nothing. Replacing an existing key always
  succeeds. BPF_NOEXIST / BPF_EXIST fail with EEXIST / ENOENT as the syscall does.
- LRU_HASH never fails for space: it evicts its least recently used entry (the kernel's LRU is
  approximate per CPU; this one is exact). `lookup` counts as a use, `peek` does not.
- Counters (`lookups`, `updates`, `deletes`, `full_errors`, `evictions`) move only on `lookup`,
  `update` and `delete`; `peek`, iteration and `len` are free, as a trace must change nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from podnet.errors import LimitExceeded

__all__ = ["BPF_ANY", "BPF_EXIST", "BPF_NOEXIST", "BpfMap", "LpmTrieMap", "MapFull", "MapType"]

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2


class MapType(enum.Enum):
    HASH = "hash"
    LRU_HASH = "lru_hash"
    HASH_OF_MAPS = "hash_of_maps"
    LPM_TRIE = "lpm_trie"


class MapFull(LimitExceeded):
    """An insert into a full BPF map: the kernel's E2BIG, with the map and the entry named."""

    def __init__(self, map_name: str, max_entries: int, what: str) -> None:
        self.map_name = map_name
        self.max_entries = max_entries
        self.what = what
        super().__init__(f"{map_name}: map is full (max_entries {max_entries}): cannot add {what} (E2BIG)")


def short_name(name: str) -> str:
    """'cilium_lb4_services_v2' -> 'lb4_services_v2': how podnet names a map in messages and paths."""
    return name[len("cilium_"):] if name.startswith("cilium_") else name


class BpfMap:
    """A BPF hash map (HASH, LRU_HASH or HASH_OF_MAPS) of packed keys and values."""

    __slots__ = ("name", "short", "map_type", "key_size", "value_size", "max_entries", "_data",
                 "lookups", "updates", "deletes", "full_errors", "evictions")

    def __init__(self, name: str, map_type: MapType, key_size: int, value_size: int | None,
                 max_entries: int) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"{name}: max_entries must be a positive integer, got {max_entries!r}")
        self.name = name
        self.short = short_name(name)
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._data: dict[bytes, object] = {}
        self.lookups = self.updates = self.deletes = self.full_errors = self.evictions = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def items(self) -> Iterator[tuple[bytes, object]]:
        return iter(list(self._data.items()))

    def peek(self, key: bytes):
        """The value without counting a lookup or touching LRU order (traces, dumps, the agent)."""
        return self._data.get(key)

    def lookup(self, key: bytes):
        """A BPF program's map_lookup_elem: counted, and a use for LRU eviction."""
        self.lookups += 1
        value = self._data.get(key)
        if value is not None and self.map_type is MapType.LRU_HASH:
            del self._data[key]          # move to the most recently used end
            self._data[key] = value
        return value

    def update(self, key: bytes, value, flags: int = BPF_ANY, *, what: str | None = None) -> None:
        """map_update_elem. Raises MapFull for a new key in a full HASH map (nothing changes)."""
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, the map's key_size is {self.key_size}")
        if self.value_size is not None and len(value) != self.value_size:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, the map's value_size is {self.value_size}")
        exists = key in self._data
        if flags == BPF_NOEXIST and exists:
            raise KeyError(f"{self.name}: {what or key.hex()} exists (EEXIST)")
        if flags == BPF_EXIST and not exists:
            raise KeyError(f"{self.name}: {what or key.hex()} does not exist (ENOENT)")
        if not exists and len(self._data) >= self.max_entries:
            if self.map_type is not MapType.LRU_HASH:
                self.full_errors += 1
                raise MapFull(self.short, self.max_entries, what or key.hex())
            del self._data[next(iter(self._data))]
            self.evictions += 1
        elif exists and self.map_type is MapType.LRU_HASH:
            del self._data[key]
        self._data[key] = value
        self.updates += 1

    def delete(self, key: bytes) -> bool:
        """map_delete_elem; False (ENOENT) when the key was not there."""
        if self._data.pop(key, None) is None:
            return False
        self.deletes += 1
        return True

    def statistics(self) -> dict:
        return {"entries": len(self._data), "max_entries": self.max_entries, "lookups": self.lookups,
                "updates": self.updates, "deletes": self.deletes, "full_errors": self.full_errors,
                "evictions": self.evictions}


class LpmTrieMap:
    """BPF_MAP_TYPE_LPM_TRIE: keys are (prefixlen, data) as `struct bpf_lpm_trie_key`, the lookup
    answers the longest stored prefix of `data`. Data is compared big-endian bit by bit, as the
    kernel does; podnet probes each stored prefix length from the longest (at most 8*len(data)+1
    dict probes; each is counted as part of one lookup)."""

    __slots__ = ("name", "short", "data_size", "max_entries", "_data", "_lengths", "lookups", "updates",
                 "deletes", "full_errors")

    def __init__(self, name: str, data_size: int, max_entries: int) -> None:
        self.name = name
        self.short = short_name(name)
        self.data_size = data_size
        self.max_entries = max_entries
        self._data: dict[tuple[int, bytes], bytes] = {}
        self._lengths: dict[int, int] = {}      # prefix length -> entries with it
        self.lookups = self.updates = self.deletes = self.full_errors = 0

    def __len__(self) -> int:
        return len(self._data)

    def _masked(self, prefixlen: int, data: bytes) -> bytes:
        if len(data) != self.data_size or not 0 <= prefixlen <= 8 * self.data_size:
            raise ValueError(f"{self.name}: bad LPM key ({prefixlen}, {len(data)} bytes)")
        bits = 8 * self.data_size
        value = int.from_bytes(data, "big")
        mask = ((1 << prefixlen) - 1) << (bits - prefixlen) if prefixlen else 0
        return (value & mask).to_bytes(self.data_size, "big")

    def update(self, prefixlen: int, data: bytes, value: bytes, *, what: str | None = None) -> None:
        key = (prefixlen, self._masked(prefixlen, data))
        if key not in self._data:
            if len(self._data) >= self.max_entries:
                self.full_errors += 1
                raise MapFull(self.short, self.max_entries, what or f"{data.hex()}/{prefixlen}")
            self._lengths[prefixlen] = self._lengths.get(prefixlen, 0) + 1
        self._data[key] = value
        self.updates += 1

    def delete(self, prefixlen: int, data: bytes) -> bool:
        key = (prefixlen, self._masked(prefixlen, data))
        if self._data.pop(key, None) is None:
            return False
        self._lengths[prefixlen] -= 1
        if not self._lengths[prefixlen]:
            del self._lengths[prefixlen]
        self.deletes += 1
        return True

    def _find(self, data: bytes):
        for prefixlen in sorted(self._lengths, reverse=True):
            value = self._data.get((prefixlen, self._masked(prefixlen, data)))
            if value is not None:
                return prefixlen, value
        return None

    def lookup(self, data: bytes):
        """(prefixlen, value) of the longest matching prefix, or None."""
        self.lookups += 1
        return self._find(data)

    def peek(self, data: bytes):
        return self._find(data)

    def items(self) -> Iterator[tuple[tuple[int, bytes], bytes]]:
        return iter(list(self._data.items()))

    def statistics(self) -> dict:
        return {"entries": len(self._data), "max_entries": self.max_entries, "lookups": self.lookups,
                "updates": self.updates, "deletes": self.deletes, "full_errors": self.full_errors}
