"""The chat daemon: the asyncio shell around :class:`~keel.chat.core.ChatCore`.

Three tasks on the service shell (:mod:`keel.service`): one long-polls
``getUpdates`` and feeds every update to the core; one sends what the core
and the verbs have to say, at the pace the :class:`~keel.chat.outbox.Outbox`
allows; one expires confirmations on time. The core's effects are carried
out in order: records through the shell's recorder (an approval durably,
before anything is done), commands through the :class:`~keel.chat.verbs.Verbs`
as tasks of their own (a slow watch never holds up the next update).

The bot token lives in memory only: it is in the URL of every call and in no
log line, record, status or error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from keel import __version__, telegram
from keel.chat import views
from keel.chat.config import ChatConfig
from keel.chat.core import (
    AnswerButton,
    ChatCore,
    Edit,
    Effect,
    Execute,
    Note,
    Outcome,
    Pending,
    Propose,
    Query,
    Record,
    Request,
    Say,
)
from keel.chat.fleet import FleetVerbs, split_target
from keel.chat.outbox import Outbox, Outgoing, answer, compose, edit
from keel.chat.switching import Switching
from keel.chat.verbs import (
    AgentView,
    LocalVerbs,
    StateChanged,
    VerbError,
    Verbs,
    describe,
    fingerprint,
)
from keel.ledger.recorder import LedgerUnavailable
from keel.safeswitch import requests
from keel.service import Daemon, Shell
from keel.watch import http_client, httpwire
from keel.watch.alert_routes import RouteLimits, retry_delay

log = logging.getLogger("keel.chat")

SEND_ATTEMPTS = 4  # tries of one reply on network and server errors
THROTTLED_ATTEMPTS = 10  # tries of one reply that keeps getting 429
EMPTY_POLL_PAUSE = 0.5  # a server that answers a long poll at once and empty is not hammered
RETRY_AFTER_MAX = 600.0  # the longest 429 wait honoured for one reply
POLL_BACKOFF = RouteLimits(retry_initial=1.0, retry_max=60.0)
MAX_UPDATES_BODY = 16 << 20  # bytes of one getUpdates answer (100 updates)
CONCURRENT_COMMANDS = 4
APPROVAL_RECORD_TIMEOUT = 5.0


class TransportError(Exception):
    """The Bot API could not be reached or sent no HTTP answer (the reason is the message)."""


def make_verbs(config: ChatConfig) -> Verbs:
    """The verbs this host's chat acts through (the fleet's will plug in here)."""
    return LocalVerbs(config.watch_socket, config.common.ledger, switching=make_switching(config))


def make_switching(config: ChatConfig) -> Switching | None:
    """``/switch``'s way to root: keel-switch@ over D-Bus, or a child process (tests, dev)."""
    settings = config.switching
    if settings is None:
        return None
    starter: requests.Starter
    if settings.runner == "systemd":
        starter = requests.SystemdStarter()
    else:
        run_dir = settings.safeswitch.run_dir
        starter = requests.ProcessStarter(
            settings.keel, settings.safeswitch_path, run_dir / "requests"
        )
    return Switching(settings.safeswitch, starter)


class Chat(Daemon):
    """The keel chat daemon (run by :func:`keel.service.main`)."""

    def __init__(
        self,
        config: ChatConfig,
        verbs: Verbs | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.keel = verbs if verbs is not None else make_verbs(config)
        self.fleet = FleetVerbs(config.fleet_socket) if config.fleet_socket is not None else None
        self.clock = clock
        self.wall = wall
        self.rng = rng or random.SystemRandom()
        self.core = ChatCore(config.policy, clock=clock, wall=wall, rng=self.rng)
        self.outbox = Outbox()
        self.shell: Shell | None = None
        self.offset = 0
        self.state = "starting"  # starting, polling, failing
        self.problem: str | None = None
        self.bot: str | None = None
        self.sent = 0
        self.failed = 0
        self.sending = 0  # replies taken from the outbox whose Bot API call has not returned
        self.last_update: float | None = None  # wall clock
        self._ssl = ssl.create_default_context() if config.api.scheme == "https" else None
        self._jobs: set[asyncio.Task[None]] = set()
        self._commands = asyncio.Semaphore(CONCURRENT_COMMANDS)
        self._wake_sender = asyncio.Event()
        self._wake_timer = asyncio.Event()

    # --- life cycle ---------------------------------------------------------------------

    async def start(self, shell: Shell) -> None:
        self.shell = shell
        policy = self.config.policy
        shell.record(
            "chat_start",
            policy.host,
            {"allowed_users": len(policy.allowed_users), "commands": sorted(policy.commands)},
        )
        shell.spawn(self._poll(), name="poll")
        shell.spawn(self._send(), name="send")
        shell.spawn(self._timers(), name="timers")

    async def stop(self) -> None:
        for job in list(self._jobs):
            job.cancel()
        await asyncio.gather(*self._jobs, return_exceptions=True)
        await self.keel.close()
        if self.fleet is not None:
            await self.fleet.close()
        if len(self.outbox):
            log.warning("stopping with %d replies unsent", len(self.outbox))
        if self.shell is not None:
            self.shell.record("chat_stop", self.config.policy.host, {"sent": self.sent})

    def summary(self) -> str:
        return f"polling Telegram as @{self.bot}" if self.bot else "connecting to Telegram"

    def status(self) -> dict[str, Any]:
        now = self.clock()
        stats = self.core.stats
        return {
            "telegram": {
                "state": self.state,
                "problem": self.problem,
                "bot": self.bot,
                "offset": self.offset,
                "last_update": self.last_update,
            },
            "host": self.config.policy.host,
            "allowed_users": len(self.config.policy.allowed_users),
            "commands": sorted(self.config.policy.commands),
            "updates": stats.updates,
            "handled": dict(stats.counts),
            "denied": stats.denied,
            "throttled": stats.throttled,
            "stale": stats.stale,
            "confirmations": {
                "offered": stats.offered,
                "approved": stats.approved,
                "cancelled": stats.cancelled,
                "expired": stats.expired,
                "refused_presses": stats.refused_presses,
                "pending": [
                    {
                        "id": p.id,
                        "user": p.request.user,
                        "action": p.action,
                        "target": p.target,
                        "expires_in": round(max(0.0, p.expires - now), 3),
                    }
                    for p in self.core.pending
                ],
            },
            "outbox": {
                "queued": len(self.outbox),
                "sending": self.sending,
                "sent": self.sent,
                "failed": self.failed,
                "dropped": self.outbox.stats.dropped,
                "throttled": self.outbox.stats.throttled,
            },
        }

    def _set_state(self, state: str, problem: str | None) -> None:
        if (state, problem) == (self.state, self.problem):
            return
        recovered = self.problem is not None and problem is None
        self.state, self.problem = state, problem
        if problem:
            log.error("telegram: %s", problem)
            return
        if recovered:
            log.info("telegram: working again")
        if self.shell is not None:
            self.shell.set_status(self.summary())

    # --- the Bot API ----------------------------------------------------------------------

    async def _call(
        self,
        method: str,
        params: Mapping[str, Any],
        *,
        timeout: float = 15.0,
        max_body: int = 1 << 20,
        item: Outgoing | None = None,
    ) -> telegram.Answer:
        url = telegram.method_url(self.config.api, self.config.token, method)
        if item is not None and item.document is not None:
            headers, body = telegram.multipart_body(
                item.form(),
                file_field="document",
                filename=item.filename or "keel.txt",
                content=item.document,
                boundary=secrets.token_hex(16),
            )
        else:
            headers, body = telegram.json_body(params)
        try:
            response = await http_client.request(
                "POST",
                url,
                headers=headers,
                body=body,
                timeout=timeout,
                max_body=max_body,
                ssl_context=self._ssl,
                user_agent=f"keel-chat/{__version__}",
            )
        except TimeoutError:
            raise TransportError(f"no answer within {timeout:g} s") from None
        except httpwire.HttpError as exc:
            raise TransportError(f"bad HTTP response: {exc}") from None
        except ssl.SSLError as exc:
            raise TransportError(f"TLS error: {exc.reason or type(exc).__name__}") from None
        except OSError as exc:
            raise TransportError(exc.strerror or type(exc).__name__) from None
        return telegram.read_answer(response)

    # --- receiving --------------------------------------------------------------------------

    async def _poll(self) -> None:
        failures = 0
        while True:
            retry_after: float | None = None
            try:
                if self.bot is None:
                    ok, retry_after = await self._get_me()
                else:
                    ok, retry_after = await self._get_updates()
            except TransportError as exc:
                ok = False
                self._set_state("failing", f"cannot reach the Bot API: {exc}")
            if ok:
                failures = 0
                continue
            failures += 1
            delay = retry_delay(POLL_BACKOFF, failures, retry_after, self.rng)
            await asyncio.sleep(min(delay, RETRY_AFTER_MAX))

    def _refused(self, method: str, answer: telegram.Answer) -> tuple[bool, float | None]:
        if answer.throttled:
            self._set_state("failing", f"{method}: flood control ({answer.reason})")
            return False, answer.retry_after
        code = answer.error_code
        if code in (401, 404):
            hint = f"the bot token in {self.config.token_file} was refused; check it (@BotFather)"
        elif code == 409:
            hint = "another process polls this bot, or it has a webhook (deleteWebhook)"
        else:
            hint = "retrying"
        self._set_state("failing", f"{method}: {answer.reason}: {hint}")
        return False, None

    async def _get_me(self) -> tuple[bool, float | None]:
        answer = await self._call("getMe", {})
        if not answer.ok:
            return self._refused("getMe", answer)
        result = answer.result if isinstance(answer.result, dict) else {}
        username = result.get("username")
        if not isinstance(username, str) or not username:
            self._set_state("failing", "getMe: the answer names no bot username")
            return False, None
        self.bot = self.core.username = username
        log.info("keel chat is @%s; polling for updates", username)
        self._set_state("polling", None)
        return True, None

    async def _get_updates(self) -> tuple[bool, float | None]:
        timeout = self.config.poll_timeout
        started = self.clock()
        answer = await self._call(
            "getUpdates",
            {
                "offset": self.offset,
                "timeout": timeout,
                "allowed_updates": ["message", "callback_query"],
            },
            timeout=timeout + 15,
            max_body=MAX_UPDATES_BODY,
        )
        if not answer.ok:
            return self._refused("getUpdates", answer)
        if not isinstance(answer.result, list):
            self._set_state("failing", "getUpdates: the answer holds no list of updates")
            return False, None
        self._set_state("polling", None)
        if not answer.result and self.clock() - started < EMPTY_POLL_PAUSE:
            await asyncio.sleep(EMPTY_POLL_PAUSE)
        for raw in answer.result:
            update_id = raw.get("update_id") if isinstance(raw, dict) else None
            if isinstance(update_id, int) and not isinstance(update_id, bool):
                self.offset = max(self.offset, update_id + 1)  # confirmed at the next call
            update = telegram.parse_update(raw)
            if update is None:
                log.info("skipped a malformed update")
                continue
            self.last_update = self.wall()
            self._apply(self.core.handle(update))
        return True, None

    # --- effects ----------------------------------------------------------------------------

    def _apply(self, effects: list[Effect]) -> None:
        for effect in effects:
            if isinstance(effect, Say):
                self._queue(
                    compose(
                        effect.chat,
                        effect.group,
                        effect.text,
                        filename=effect.filename,
                        reply_to=effect.reply_to,
                        buttons=effect.buttons,
                        confirmation=effect.confirmation,
                    )
                )
            elif isinstance(effect, Edit):
                self._queue(edit(effect.chat, effect.message_id, effect.text))
            elif isinstance(effect, AnswerButton):
                self._queue(answer(effect.callback_id, effect.text))
            elif isinstance(effect, Record):
                if self.shell is not None:
                    self.shell.record(effect.kind, effect.subject, effect.data)
                log.info("%s by %s: %s", effect.kind, effect.subject, dict(effect.data))
            elif isinstance(effect, Note):
                log.info("%s", effect.text)
            elif isinstance(effect, Query):
                self._job(self._query(effect.request), effect.request)
            elif isinstance(effect, Propose):
                self._job(self._propose(effect), effect.request)
            elif isinstance(effect, Execute):
                self._job(self._execute(effect), effect.pending.request)
        self._wake_timer.set()

    def _queue(self, item: Outgoing) -> None:
        if not self.outbox.push(item):
            log.warning("a reply to chat %s was dropped: its queue is full", item.chat)
        self._wake_sender.set()

    def _reply(self, request: Request, text: str, filename: str = "keel.txt") -> None:
        self._apply(
            [
                Say(
                    request.chat,
                    not request.private,
                    text,
                    filename=filename,
                    reply_to=request.message_id,
                )
            ]
        )

    def _job(self, work: Coroutine[Any, Any, None], request: Request) -> None:
        async def run() -> None:
            async with self._commands:
                try:
                    await work
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug here must not stop the bot
                    log.exception("/%s failed (a keel bug: please report it)", request.command)
                    self._reply(request, f"/{request.command} failed: internal error; see the log.")

        task = asyncio.get_running_loop().create_task(run(), name=f"chat:{request.command}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _query(self, request: Request) -> None:
        now = self.wall()
        name = request.command
        try:
            if name == "status":
                text = views.status(await self.keel.host(), now)
            elif name == "agents":
                text = views.agents(await self.keel.host(), now)
            elif name == "switch":  # alone: the targets
                text = views.switch_targets(
                    await self.keel.switch_targets(), self.config.policy.host
                )
            elif name == "fleet":
                text = views.fleet(await self._fleet().view(), now)
            else:  # log (the core only lets known read-only commands through)
                text = views.log(await self.keel.log(int(request.args[0])), self.config.policy.host)
        except VerbError as exc:
            text = f"/{name}: {exc}"
        self._reply(request, text, filename=f"{name}.txt")

    def _fleet(self) -> FleetVerbs:
        if self.fleet is None:
            raise VerbError(
                f"{self.config.policy.host}'s chat speaks for this host only "
                "(fleet_socket is null in its config)"
            )
        return self.fleet

    async def _look(self, target: str) -> AgentView:
        """The agent ``target`` names: here, or ``AGENT@NODE`` through the fleet."""
        agent, node = split_target(target)
        if node is None:
            return await self.keel.agent(agent)
        return (await self._fleet().agent(agent, node))[1]

    async def _propose(self, proposal: Propose) -> None:
        try:
            if proposal.action == "switch":
                view = await self.keel.switch_target(proposal.target)
                state, shown = view.fingerprint, view.describe()
            else:
                agent = await self._look(proposal.target)
                state, shown = fingerprint(agent), describe(agent)
                if agent.last_error:
                    shown += f"; last error: {views.clip_error(agent.last_error)}"
        except VerbError as exc:
            verb = "switch to" if proposal.action == "switch" else proposal.action
            self._reply(proposal.request, f"Cannot {verb} {proposal.target}: {exc}")
            return
        self._apply(
            self.core.offer(proposal.request, proposal.action, proposal.target, state, shown)
        )

    async def _execute(self, execute: Execute) -> None:
        pending = execute.pending
        outcome = Outcome(
            "failed", f"{pending.action} {pending.target}: internal error; see the log"
        )
        try:
            outcome = await self._carry_out(execute)
        finally:
            self._apply(self.core.finished(pending, outcome))

    async def _carry_out(self, execute: Execute) -> Outcome:
        pending, approval = execute.pending, execute.approval
        assert self.shell is not None
        try:
            await self.shell.recorder.record_durable(
                approval.kind, approval.subject, approval.data, timeout=APPROVAL_RECORD_TIMEOUT
            )
        except LedgerUnavailable as exc:
            return Outcome("refused", f"Not done: the ledger cannot record your approval ({exc}).")
        target = pending.target
        if pending.action == "switch":
            return await self._switch(pending)
        try:
            name, node = split_target(target)
            if node is None:
                text = views.restarted(await self.keel.restart(name, expect=pending.state))
            else:
                text = await self._fleet().restart(name, node, expect=pending.state)
        except StateChanged as exc:
            return Outcome(
                "refused", f"Not done: {exc}. Send /restart {target} again if you still mean it."
            )
        except VerbError as exc:
            return Outcome("failed", f"Restart of {target} failed: {exc}")
        return Outcome("done", text)

    async def _switch(self, pending: Pending) -> Outcome:
        target = pending.target
        request = requests.new_request_id(self.rng.getrandbits(64))
        try:
            result = await self.keel.switch(target, expect=pending.state, request=request)
        except StateChanged as exc:
            return Outcome(
                "refused",
                f"Not done: {exc}. Send /switch {target} again if you still mean it.",
                {"request": request},
            )
        except VerbError as exc:
            return Outcome("failed", f"Switch to {target} failed: {exc}", {"request": request})
        return views.switched(target, self.config.policy.host, result)

    # --- sending ----------------------------------------------------------------------------

    async def _send(self) -> None:
        while True:
            now = self.clock()
            item = self.outbox.take(now)
            if item is None:
                self._wake_sender.clear()
                at = self.outbox.next_time(now)
                timeout = None if at is None else max(0.0, at - self.clock())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake_sender.wait()
                continue
            await self._deliver(item)

    async def _deliver(self, item: Outgoing) -> None:
        self.sending += 1
        try:
            await self._deliver_now(item)
        finally:
            self.sending -= 1

    async def _deliver_now(self, item: Outgoing) -> None:
        try:
            result = await self._call(item.method, item.params(), item=item)
        except TransportError as exc:
            self._again(item, f"cannot reach the Bot API: {exc}", None)
            return
        if result.ok:
            self.sent += 1
            if item.confirmation is not None and isinstance(result.result, dict):
                message_id = result.result.get("message_id")
                if isinstance(message_id, int):
                    self._apply(self.core.shown(item.confirmation, message_id))
            return
        if result.retryable:
            self._again(item, result.reason, result.retry_after if result.throttled else None)
            return
        if item.method == "editMessageText" and "not modified" in result.description:
            return
        self.failed += 1
        log.warning(
            "%s to chat %s refused: %s (not retried)", item.method, item.chat, result.reason
        )
        if result.error_code == 401:
            self._set_state("failing", f"{item.method}: {result.reason}: the bot token was refused")

    def _again(self, item: Outgoing, reason: str, retry_after: float | None) -> None:
        """Try ``item`` again later: after ``retry_after`` (a 429), else with back-off."""
        if item.attempts + 1 >= (SEND_ATTEMPTS if retry_after is None else THROTTLED_ATTEMPTS):
            self.failed += 1
            log.warning(
                "%s to chat %s dropped after %d attempts: %s",
                item.method,
                item.chat,
                SEND_ATTEMPTS,
                reason,
            )
            return
        delay = retry_delay(POLL_BACKOFF, item.attempts + 1, retry_after, self.rng)
        if delay > RETRY_AFTER_MAX:
            self.failed += 1
            log.warning(
                "%s to chat %s dropped: %s; asked to wait %g s",
                item.method,
                item.chat,
                reason,
                delay,
            )
            return
        log.info("%s to chat %s: %s; again in %.1f s", item.method, item.chat, reason, delay)
        # A 429 holds the chat it was for; a network or server error holds every send.
        self.outbox.throttle(item.chat if retry_after is not None else None, delay, self.clock())
        self.outbox.retry(item)
        self._wake_sender.set()

    # --- confirmations' time -------------------------------------------------------------

    async def _timers(self) -> None:
        while True:
            self._apply_expired()
            deadline = self.core.next_deadline()
            self._wake_timer.clear()
            timeout = None if deadline is None else max(0.0, deadline - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake_timer.wait()

    def _apply_expired(self) -> None:
        effects = self.core.tick()
        if effects:
            self._apply(effects)
