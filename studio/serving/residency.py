"""Which adapters are resident in which LoRA slot: resolve a registry reference against the loaded base (fingerprint),
load it into a free slot, evict the least recently used idle one when the slots are full.

Owns the map reference -> slot and the slot buffers (studio.lora.slots.LoraSlots). It is the one owner of adapter
state at serving time: loading or evicting an adapter writes or clears its own slot and nothing else, so rows of other
adapters in flight are undisturbed. Callers hold the engine's model lock around `acquire` / `evict` (they write the
slot buffers a forward pass reads); `resolve` needs no lock (a registry lookup).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from studio.errors import ModelError, RegistryError, StudioError
from studio.lora.slots import LoraSlots
from studio.serving.requests import BASE_NAMES

logger = logging.getLogger(__name__)


@dataclass
class Resident:
    ref: str            # canonical "domain@vN"
    slot: int           # index into every LoRA layer's slot buffers
    sha: str
    users: int = 0      # requests in flight using it: never evicted while > 0


class NoRoom(StudioError):
    """Every resident adapter is in use: a queued request waits for one to finish; a direct load() fails."""


class Residency:
    def __init__(self, base, registry, max_resident: int, allow_base_mismatch: bool = False, notify=None,
                 counters=None):
        self.base = base
        self.registry = registry
        self.max_resident = max_resident
        self.allow_base_mismatch = allow_base_mismatch
        self.slots = LoraSlots(base.model, max_resident)
        self.entries: collections.OrderedDict[str, Resident] = collections.OrderedDict()  # LRU first
        self._notify = notify or (lambda event, **info: None)
        self.counters = counters if counters is not None else collections.Counter()

    def resolve(self, ref: str | None):
        """None / "" / "base" / the base id -> None; else the AdapterVersion, checked against the loaded base."""
        if ref is None or ref in BASE_NAMES or ref == self.base.ref:
            return None
        try:
            return self.registry.resolve(ref, base_fingerprint=self.base.fingerprint,
                                         allow_mismatch=self.allow_base_mismatch)
        except RegistryError as exc:
            if "was trained on base" in str(exc):
                raise ModelError(str(exc)) from exc
            raise

    def acquire(self, version) -> Resident:
        """The resident entry of `version`, loading it into a free slot (evicting the LRU idle adapter) if needed."""
        entry = self.entries.get(version.ref)
        if entry is not None and entry.sha == version.sha:
            self.entries.move_to_end(version.ref)
            return entry
        if entry is not None:  # same name, other content (should not happen: versions are immutable)
            self.evict(entry)
        while len(self.entries) >= self.max_resident:
            idle = [e for e in self.entries.values() if e.users == 0]
            if not idle:
                raise NoRoom(f"all {self.max_resident} resident adapters are in use by requests in flight; "
                             f"retry when they finish, or raise max_resident (studio serve --max-resident)")
            self.evict(idle[0])
        used = {e.slot for e in self.entries.values()}
        slot = min(s for s in range(self.max_resident) if s not in used)
        t0 = time.perf_counter()
        try:
            self.slots.load(slot, self.registry.path(version.ref))
        except ModelError as exc:
            self.slots.clear(slot)
            raise ModelError(f"{version.ref}: {exc}") from exc
        entry = Resident(version.ref, slot, version.sha)
        self.entries[version.ref] = entry
        seconds = time.perf_counter() - t0
        self.counters["adapter_loads"] += 1
        self._notify("adapter_load", ref=version.ref, seconds=seconds)
        logger.info("loaded adapter %s into slot %d in %.3fs (%d resident)", version.ref, slot, seconds,
                    len(self.entries))
        return entry

    def evict(self, entry: Resident) -> None:
        if entry.users:
            raise StudioError(f"{entry.ref} is in use by {entry.users} request(s); unload it when they finish")
        self.slots.clear(entry.slot)
        del self.entries[entry.ref]
        self.counters["adapter_evictions"] += 1
        self._notify("adapter_evict", ref=entry.ref)

    def resident(self) -> list[str]:
        return list(self.entries)
