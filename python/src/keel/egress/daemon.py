"""`keel egress serve`: the rules, the proxy and the log listener, on keel's service shell.

Start: the table ``inet keel`` is listed, and one transaction replaces its
rules while keeping its sets (a restarted daemon keeps what agents already
resolved; only addresses of names the new allowlists no longer cover go).
Then the agents' listeners open and the daemon is ready. Stop: listeners
close; the rules stay (``on_stop: keep``, the default: agents keep what
they have and resolve nothing new, failing closed) or the table goes
(``on_stop: remove``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Mapping
from typing import Any

from keel.api import Handler, Peer
from keel.egress import nft, ruleset
from keel.egress.answers import AnswerCache, IPAddress
from keel.egress.config import AgentEgress, EgressConfig, resolve_uids
from keel.egress.denials import Aggregator, BlockedFlow, DeniedName, Event, Observations, suggest
from keel.egress.netlink import SetWriter
from keel.egress.nflog import NflogListener
from keel.egress.proxy import AgentListeners, Proxy, UpstreamClient
from keel.egress.sets import SetBook, names_of
from keel.errors import KeelError, UsageError
from keel.service import Daemon, Shell

log = logging.getLogger("keel.egress")

HOUSEKEEPING = 1.0  # seconds between flushes of aggregated denials
APPLY_ATTEMPTS = 3


class Egress(Daemon):
    """The egress daemon: one per host (per network namespace)."""

    def __init__(self, config: EgressConfig) -> None:
        self.config = config
        self.clock = time.monotonic
        self.book = SetBook(clock=self.clock, min_ttl=config.min_ttl, grace=config.grace)
        self.cache = AnswerCache(clock=self.clock, max_entries=config.cache_size)
        self.aggregator = Aggregator(clock=time.time)
        self.observations = Observations(clock=time.time)
        self.uids: dict[str, int] = {}
        self.listeners: dict[str, AgentListeners] = {}
        self.writer: SetWriter | None = None
        self.nflog: NflogListener | None = None
        self.proxy: Proxy | None = None
        self.shell: Shell | None = None
        self.rules_applied: float | None = None
        self.sets_adopted: float | None = None  # when the kernel's elements were read
        self.rule_count = 0
        self.removed_on_apply = 0  # addresses no longer allowed, taken out with the rules

    # --- lifecycle --------------------------------------------------------

    async def start(self, shell: Shell) -> None:
        self.shell = shell
        self.uids = resolve_uids(self.config)
        self.writer = SetWriter()
        self.apply_rules()
        self.proxy = Proxy(
            upstream=UpstreamClient(self.config.upstream, timeout=self.config.upstream_timeout),
            cache=self.cache,
            book=self.book,
            inserter=self.writer,
            on_denied=self._denied,
            on_asked=self.observations.asked,
        )
        for name, agent in sorted(self.config.agents.items()):
            listeners = AgentListeners(self.proxy, agent)
            try:
                await listeners.start()
            except OSError as exc:
                raise KeelError(str(exc.strerror or exc)) from None
            self.listeners[name] = listeners
        self._open_nflog()
        shell.record(
            "egress.rules",
            "applied",
            {
                "agents": {
                    name: {
                        "uid": self.uids[name],
                        "port": agent.port,
                        "mode": agent.mode,
                        "allow": len(agent.allow),
                    }
                    for name, agent in sorted(self.config.agents.items())
                },
                "rules": self.rule_count,
            },
        )
        shell.spawn(self._housekeeping(), name="housekeeping")
        shell.spawn(self._adopt_sets(), name="adopt-sets")
        log.info(
            "egress enforces %d agent(s) with %d rules", len(self.config.agents), self.rule_count
        )

    def _open_nflog(self) -> None:
        listener = NflogListener(self.config.log_group, self._blocked)
        try:
            listener.open()
        except OSError as exc:
            log.warning(
                "cannot listen to NFLOG group %d (%s): drops are enforced and counted, "
                "but not recorded in the ledger",
                self.config.log_group,
                exc.strerror,
            )
            return
        listener.attach(asyncio.get_running_loop())
        self.nflog = listener

    async def stop(self) -> None:
        for listeners in self.listeners.values():
            await listeners.close()
        self.listeners.clear()
        if self.nflog is not None:
            self.nflog.close(asyncio.get_running_loop())
            self.nflog = None
        self._record_entries(self.aggregator.flush(force=True))
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.rules_applied is None:
            return
        if self.config.on_stop == "remove":
            try:
                nft.apply(ruleset.remove())
            except KeelError as exc:
                log.error("could not remove the egress table: %s", exc)  # noqa: TRY400
                return
            self._record("egress.rules", "removed", {"on_stop": "remove"})
            log.info("egress table removed (on_stop: remove)")
        else:
            self._record("egress.rules", "kept", {"on_stop": "keep"})
            log.info("egress rules stay in place (on_stop: keep): agents resolve nothing new")

    # --- the rules --------------------------------------------------------

    def rule_agents(self) -> list[ruleset.AgentRules]:
        return [
            ruleset.AgentRules(
                name,
                self.uids[name],
                agent.port,
                agent.enforced,
                ruleset.allowlist_fingerprint(agent.allow.texts()),
            )
            for name, agent in sorted(self.config.agents.items())
        ]

    def _still_allowed(self, agent: str, name: str) -> bool:
        try:
            return self.config.agents[agent].allow.allows_text(name)
        except ValueError:
            return False

    def apply_rules(self) -> None:
        """Replace the table's rules, keeping its sets and what they hold that is still allowed.

        The listing is terse (no elements), so this takes the same time with
        a hundred addresses or a hundred thousand; only the sets of agents
        whose allowlist changed since their elements were written are read,
        and what those no longer allow leaves in the same transaction as the
        old rules (no moment exists in which the new rules accept it). The
        book learns the elements afterwards (:meth:`_adopt_sets`) and, until
        then, replaces rather than adds.
        """
        agents = self.rule_agents()
        last: KeelError | None = None
        for _ in range(APPLY_ATTEMPTS):
            current = nft.list_table(elements=False)
            changed = ruleset.unvouched(current, agents)
            stale: dict[str, list[IPAddress]] = {}
            refill: dict[str, list[ruleset.Element]] = {}
            if changed:
                listed = nft.list_sets(
                    [ruleset.set_name(agent.name, family) for agent in changed for family in (4, 6)]
                )
                stale = ruleset.stale_elements(listed, changed, self._still_allowed)
                for name, gone in stale.items():
                    dropped = set(gone)
                    refill[name] = [e for e in listed.sets[name] if e.address not in dropped]
            document = ruleset.replace(
                agents, log_group=self.config.log_group, current=current, refill=refill
            )
            try:
                nft.apply(document)
            except KeelError as exc:
                last = exc  # the table changed under us: list again
                continue
            self.rule_count = ruleset.rule_count(document)
            self.rules_applied = time.time()
            for name, gone in stale.items():
                self.book.forget(ruleset.agent_of_set(name), gone)
                self.removed_on_apply += len(gone)
            for name in self.config.agents:
                self.book.expect(name)
            return
        assert last is not None
        raise KeelError(f"cannot install the egress rules: {last}")

    async def _adopt_sets(self) -> None:
        """Learn what the sets held before this daemon, and drop what is no longer allowed."""
        agents = self.rule_agents()
        for _ in range(APPLY_ATTEMPTS):
            listed = self.clock()
            try:
                current = await asyncio.to_thread(nft.list_table)
            except KeelError as exc:
                log.warning("cannot list the egress sets: %s", exc)
                return
            if current is None:
                return  # the table is gone: _check_table puts it back
            stale = {
                set_name: [
                    address
                    for address in addresses
                    if not self.book.written_since(ruleset.agent_of_set(set_name), address, listed)
                ]
                for set_name, addresses in ruleset.stale_elements(
                    current, agents, self._still_allowed
                ).items()
            }
            removed = sum(len(addresses) for addresses in stale.values())
            if removed:
                try:
                    await asyncio.to_thread(nft.apply, ruleset.delete_elements(stale))
                except KeelError:
                    continue  # an element expired meanwhile: list again
            kept = 0
            for name in self.config.agents:
                elements = []
                for family in (4, 6):
                    set_name = ruleset.set_name(name, family)
                    gone = set(stale.get(set_name, ()))
                    elements += [
                        (e.address, e.expires, names_of(e.comment)[0])
                        for e in current.sets.get(set_name, [])
                        if e.address not in gone
                    ]
                    if gone:
                        self.book.forget(name, gone)
                self.book.adopt(name, elements, listed=listed)
                kept += len(elements)
            self.sets_adopted = time.time()
            removed += self.removed_on_apply
            self.removed_on_apply = 0
            self._record(
                "egress.rules", "adopted", {"kept_addresses": kept, "removed_addresses": removed}
            )
            log.info(
                "egress sets: kept %d address(es), removed %d no longer allowed", kept, removed
            )
            return
        log.warning(
            "could not read the egress sets in %d attempts; addresses are replaced, not added, meanwhile",
            APPLY_ATTEMPTS,
        )

    def _check_table(self) -> None:
        """Put the rules back if someone removed keel's table or its chains."""
        try:
            current = nft.list_table(elements=False)
        except KeelError as exc:
            log.warning("cannot list the egress table: %s", exc)
            return
        chains, _sets, _counters = ruleset.wanted_objects(self.rule_agents())
        if current is not None and set(chains) <= current.chains:
            return
        log.error("the egress table was removed or changed behind keel's back: restoring it")
        if current is None:
            for name in self.config.agents:
                self.book.forget(name)
        try:
            self.apply_rules()
        except KeelError as exc:
            log.error("could not restore the egress table: %s", exc)  # noqa: TRY400
            return
        self._record("egress.rules", "restored", {"rules": self.rule_count})
        if self.shell is not None:
            self.shell.spawn(self._adopt_sets(), name="adopt-sets")

    async def _housekeeping(self) -> None:
        last_check = self.clock()
        while True:
            await asyncio.sleep(HOUSEKEEPING)
            self._record_entries(self.aggregator.flush())
            self.book.prune()
            if self.clock() - last_check >= self.config.table_check:
                last_check = self.clock()
                self._check_table()

    # --- denials ----------------------------------------------------------

    def _record(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        if self.shell is not None:
            self.shell.record(kind, subject, data)

    def _record_entries(self, entries: list[Any]) -> None:
        for entry in entries:
            self._record(entry.kind, entry.subject, entry.data)

    def _event(self, event: Event) -> None:
        self.observations.denied(event)
        self._record_entries(self.aggregator.observe(event))

    def _denied(self, event: DeniedName) -> None:
        self._event(event)

    def _blocked(self, event: BlockedFlow) -> None:
        if event.agent in self.config.agents:
            self._event(event)

    # --- control ----------------------------------------------------------

    def summary(self) -> str:
        count = len(self.config.agents)
        return f"enforcing egress for {count} agent{'s' if count != 1 else ''}"

    def kernel_counters(self) -> dict[str, tuple[int, int]]:
        try:
            table = nft.list_table(elements=False)
        except KeelError:
            return {}
        return table.counters if table else {}

    def agent_status(
        self, name: str, agent: AgentEgress, counters: Mapping[str, Any]
    ) -> dict[str, Any]:
        v4, v6 = self.book.sizes(name)
        packets, octets = counters.get(ruleset.counter_name(name), (None, None))
        proxy = self.proxy.counters_of(name).as_dict() if self.proxy else {}
        listeners = self.listeners.get(name)
        return {
            "mode": agent.mode,
            "uid": self.uids.get(name),
            "port": agent.port,
            "allow": agent.allow.texts(),
            "listening": listeners.addresses if listeners else [],
            "sets": {"v4": v4, "v6": v6},
            "blocked": {"packets": packets, "bytes": octets},
            "dns": proxy,
            "recent": self.observations.recent(name),
        }

    def status(self) -> dict[str, Any]:
        counters = self.kernel_counters()
        return {
            "table": f"{ruleset.FAMILY} {ruleset.TABLE}",
            "rules": self.rule_count,
            "rules_applied": self.rules_applied,
            "sets_adopted": self.sets_adopted,
            "upstream": [str(u) for u in self.config.upstream],
            "min_ttl": self.config.min_ttl,
            "grace": self.config.grace,
            "on_stop": self.config.on_stop,
            # The daemon's CPU time so far: divided by the queries answered, what
            # an answer costs whatever the machine's load (bench/egress/run.py).
            "cpu_seconds": _cpu_seconds(),
            "cache": {
                "entries": len(self.cache),
                "hits": self.cache.hits,
                "misses": self.cache.misses,
            },
            "nflog": {
                "group": self.config.log_group,
                "listening": self.nflog is not None,
                "lost": self.nflog.lost if self.nflog else 0,
            },
            "agents": {
                name: self.agent_status(name, agent, counters)
                for name, agent in sorted(self.config.agents.items())
            },
        }

    def verbs(self) -> Mapping[str, Handler]:
        return {"suggest": self.suggest, "sets": self.sets}

    def _agent_arg(self, args: dict[str, Any]) -> AgentEgress:
        name = args.get("agent")
        if not isinstance(name, str) or name not in self.config.agents:
            known = ", ".join(sorted(self.config.agents)) or "none"
            raise UsageError(f"unknown agent {name!r} (egress knows: {known})")
        return self.config.agents[name]

    async def suggest(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """An allowlist for an agent from the names it asked for (in audit mode: all of them)."""
        agent = self._agent_arg(args)
        collapse = args.get("collapse", 0)
        if not isinstance(collapse, int) or isinstance(collapse, bool) or collapse < 0:
            raise UsageError("collapse: expected a whole number >= 0")
        seen = self.observations.summary(agent.name)
        proposed = suggest(seen["names"], current=agent.allow, collapse=collapse)
        return {
            "agent": agent.name,
            "mode": agent.mode,
            "current": agent.allow.texts(),
            "add": proposed,
            "allow": agent.allow.texts() + proposed,
            "names": seen["names"],
            "denied": seen["denied"],
            "addresses": seen["addresses"],
            "overflow": seen["overflow"],
        }

    async def sets(self, args: dict[str, Any], peer: Peer) -> dict[str, Any]:
        """What keel put into an agent's sets: address, seconds left, the names it is open for."""
        agent = self._agent_arg(args)
        return {
            "agent": agent.name,
            "elements": [
                # name: the latest name it was opened for; names: all of them, oldest first.
                {"address": str(address), "expires": left, "name": names[-1], "names": list(names)}
                for address, left, names in self.book.entries(agent.name)
                if names
            ],
        }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return round(usage.ru_utime + usage.ru_stime, 3)
