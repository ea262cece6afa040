"""What a node says for itself: its status, its signed checkpoint and proofs.

The shell side of :mod:`keel.fleet.status` and of the witness protocol: it
asks watch and keel's services over their control sockets, reads the running
system's links, and signs the ledger's head with the ledger key (the same key
the recorder signs its checkpoints with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from keel import __version__
from keel.api import acall
from keel.errors import KeelError
from keel.fleet.config import FleetConfig
from keel.fleet.status import ServiceAnswer, node_report
from keel.ledger import core
from keel.ledger.errors import LedgerError
from keel.ledger.keys import default_key_path, load_signer, signer_for
from keel.ledger.store import Ledger, StoredCheckpoint

log = logging.getLogger("keel.fleet")

SERVICE_TIMEOUT = 1.0  # seconds a local service has to answer `status`
CHECKPOINT_REUSE = 5.0  # seconds a signed head is handed out again rather than re-signed
_GENERATION = re.compile(r".*-(\d+)-link\Z")
# What a node reports of its last switch (keel switch status's fields).
SWITCH_FIELDS = (
    "id",
    "phase",
    "in_progress",
    "interrupted_by_reboot",
    "old",
    "new",
    "reason",
    "started_at",
    "updated_at",
    "rolled_back_by",
)


class NoLedger(KeelError):
    """This node keeps no ledger (or cannot read it), so it has no checkpoint to give."""


class LocalNode:
    def __init__(
        self,
        config: FleetConfig,
        *,
        mesh_status: Callable[[], Any],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.mesh_status = mesh_status  # async () -> the mesh daemon's status
        self.clock = clock
        self.wall = wall
        self._ledger: Ledger | None = None
        self._signed: tuple[float, StoredCheckpoint] | None = None
        self._lock = asyncio.Lock()

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.close()
            self._ledger = None

    # --- status ---------------------------------------------------------------------

    async def report(self, node: str) -> dict[str, Any]:
        targets = dict(self.config.services)
        if self.config.watch is not None:
            targets["watch"] = self.config.watch
        names = list(targets)
        answers = await asyncio.gather(*(self._service(n, targets[n]) for n in names))
        by_name = dict(zip(names, answers, strict=True))
        switch = await asyncio.to_thread(self.last_switch)
        return node_report(
            node=node,
            host=self.config.host,
            version=__version__,
            now=self.wall(),
            watch=by_name["watch"] if self.config.watch is not None else None,
            services=[by_name[n] for n in names if n in self.config.services],
            system=self.system(),
            switch=switch,
        )

    async def _service(self, name: str, socket: Path | None) -> ServiceAnswer:
        """``status`` of one keel service (``socket`` None: the mesh, through its client)."""
        try:
            if socket is None:
                status = await asyncio.wait_for(self.mesh_status(), SERVICE_TIMEOUT)
                return ServiceAnswer(name, _mesh_shape(status))
            status = await acall(socket, "status", timeout=SERVICE_TIMEOUT, service=name)
        except (KeelError, TimeoutError) as exc:
            return ServiceAnswer(name, None, str(exc) or "no answer")
        if not isinstance(status, dict):
            return ServiceAnswer(name, None, "its status is not an object")
        return ServiceAnswer(name, status)

    def last_switch(self) -> dict[str, Any] | None:
        """The switch in progress or the last one and how it ended (``keel switch status``)."""
        from keel.safeswitch import config as safeswitch_config
        from keel.safeswitch import views

        try:
            status = views.status(safeswitch_config.load(self.config.safeswitch), wall=self.wall())
        except (KeelError, OSError, ValueError) as exc:
            return {"error": f"the switch state cannot be read: {exc}"}
        switch = status.get("switch")
        if not isinstance(switch, dict):
            return None
        summary = {key: switch.get(key) for key in SWITCH_FIELDS}
        summary["outcome"] = None if switch.get("in_progress") else switch.get("phase")
        return summary

    def system(self) -> dict[str, Any]:
        """The running system's store path and the profile's generation number."""
        current = _readlink(self.config.current_system, resolve=True)
        link = _readlink(self.config.profile, resolve=False)
        generation = None
        if link is not None and (match := _GENERATION.match(link)) is not None:
            generation = int(match.group(1))
        return {"current": current, "generation": generation}

    # --- checkpoints ---------------------------------------------------------------

    async def checkpoint(self, sizes: Sequence[int]) -> dict[str, Any]:
        """The ledger's head, freshly signed, with consistency proofs from each of ``sizes``."""
        async with self._lock:
            return await asyncio.to_thread(self._checkpoint, list(sizes))

    def _checkpoint(self, sizes: list[int]) -> dict[str, Any]:
        path = self.config.common.ledger
        if path is None:
            raise NoLedger("this node keeps no ledger (ledger is null in its fleet config)")
        try:
            if self._ledger is None:
                self._ledger = Ledger.open(path, create=False)
            signer = signer_for(self._ledger)
            now = self.clock()
            if self._signed is None or now - self._signed[0] > CHECKPOINT_REUSE:
                self._signed = (now, self._ledger.checkpoint(signer))
            stored = self._signed[1]
            proofs: dict[int, list[bytes] | None] = {}
            for size in sizes:
                if size > stored.size:
                    proofs[size] = None
                elif size > 0:
                    proofs[size] = list(self._ledger.consistency_proof(size, stored.size).proof)
                else:
                    proofs[size] = []
        except (LedgerError, OSError) as exc:
            self.close()
            self._signed = None
            raise NoLedger(f"cannot sign this node's ledger head: {exc}") from None
        return {"ledger_key": str(signer.verifier), "note": stored.note, "proofs": proofs}

    def ledger_key(self) -> str | None:
        """This node's ledger verifier key, once its ledger has one."""
        path = self.config.common.ledger
        if path is None:
            return None
        with contextlib.suppress(LedgerError, OSError):
            return str(load_signer(default_key_path(path)).verifier)
        return None

    def verify_own(self, note: str) -> core.Checkpoint | None:
        """``note``'s checkpoint if this node's ledger key signed it, else None."""
        key = self.ledger_key()
        if key is None:
            return None
        try:
            return core.open_checkpoint(note, core.Verifier.parse(key))
        except LedgerError:
            return None


def _mesh_shape(status: Mapping[str, Any]) -> dict[str, Any]:
    """The mesh's status in the shape of the other services' (it predates the service shell)."""
    shaped = dict(status)
    shaped.setdefault("service", {})
    return shaped


def _readlink(path: Path, *, resolve: bool) -> str | None:
    try:
        return str(path.resolve(strict=True)) if resolve else os.readlink(path)
    except (OSError, RuntimeError):
        return None
