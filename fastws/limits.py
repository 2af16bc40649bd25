"""The limit zones' shared memory (nginx's limit_conn_zone and limit_req_zone).

The master maps each zone (MAP_SHARED | MAP_ANONYMOUS) before it forks its workers, so every
worker's engine counts in the same place (includes/zone.h holds the layout and the counting).
A reload keeps a zone whose name, kind and size are unchanged, with its counts, as nginx keeps
a zone of the same size; a zone that changed is made anew, and the old mapping stays in the
old workers, which inherited it, until they exit.  A worker that dies holding a zone's lock
has it released by the master (`force_unlock`).
"""

from __future__ import annotations

import ctypes
import mmap
from typing import Any, Mapping

from . import _engine
from .config import Config, LimitZone

SLOT_BYTES = 32
WAYS = 8


def buckets(size: int) -> int:
    """The 8-slot buckets a zone of `size` bytes holds."""
    return max(1, size // (SLOT_BYTES * WAYS))


class Zones:
    """The mappings of one instance's zones, by name."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[tuple[str, int], mmap.mmap, int]] = {}

    def prepare(self, config: Config) -> dict[str, int]:
        """Map the zones `config` names (keeping unchanged ones); their addresses by name."""
        kept: dict[str, tuple[tuple[str, int], mmap.mmap, int]] = {}
        for zone in config.limit_zones:
            shape = (zone.kind, buckets(zone.size))
            old = self._maps.get(zone.name)
            if old is not None and old[0] == shape:
                kept[zone.name] = old
                _engine.zone_set_rate(old[2], zone.rate)
                continue
            kept[zone.name] = self._map(zone, shape)
        # (a mapping no longer named is unmapped here, when dropped: old workers keep theirs)
        self._maps = kept
        return self.addresses()

    @staticmethod
    def _map(zone: LimitZone, shape: tuple[str, int]) -> tuple[tuple[str, int], mmap.mmap, int]:
        mem = mmap.mmap(-1, _engine.zone_bytes(shape[1]),
                        flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mem))
        _engine.zone_init(address, shape[1], zone.rate)
        return shape, mem, address

    def addresses(self) -> dict[str, int]:
        return {name: entry[2] for name, entry in self._maps.items()}

    def force_unlock(self, pid: int) -> list[str]:
        """A worker died: release every zone lock it held; the names of those zones."""
        return [name for name, (_, _, address) in self._maps.items()
                if _engine.zone_force_unlock(address, pid)]


def figures(addresses: Mapping[str, int], config: Config) -> dict[str, Any]:
    """Each zone's counters, for the status pages."""
    kinds = {z.name: z.kind for z in config.limit_zones}
    return {name: dict(_engine.zone_figures(address), kind=kinds.get(name, ""))
            for name, address in addresses.items()}
