"""The pure core of keel chat: who may do what, confirmations, and what to answer.

Updates go in, effects come out (h11's shape); no I/O, the time comes from
the clocks given, randomness from the random source given. The rules:

- **The person, not the chat.** Every update, a button press included, is
  judged by its sender's user id (``from.id``) against the allowlist; the chat
  it came from grants nothing. Anyone else gets no answer at all (their
  attempt is logged and recorded, at most once per person per 10 minutes).
- **Typed commands only.** ``/status``, ``/agents``, ``/log [N]``, ``/restart
  AGENT``, ``/switch TARGET`` (a target root declared, by name); anything else
  is refused with the list of what exists. Which commands a host takes is
  config (read-only ones by default).
- **Changes need a private chat and a confirmation.** A mutating command in
  a group is refused. In a private chat it is answered with a confirmation
  (two buttons) bound to the person, the chat, the action, the target and the
  state the person was shown; it can be used once, by that person, within
  ``confirm_timeout`` seconds (60 at most). Anyone else's press does nothing.
  Whether the target is still in the state shown is checked where the action
  runs (:mod:`keel.chat.verbs`), just before it does.
- **No floods.** A person gets a burst of commands, then one every few
  seconds; past that, one notice and silence until the bucket refills.
- **Stale commands are not carried out.** A command older than ``max_age``
  (typed while keel chat was down) is skipped: the person meant it then.
"""

from __future__ import annotations

import base64
import random
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from keel.safeswitch.targets import NAME as _SWITCH_TARGET
from keel.telegram import CallbackQuery, Message, Update

# --- commands -----------------------------------------------------------------------


@dataclass(frozen=True)
class CommandSpec:
    name: str
    mutating: bool
    usage: str
    summary: str


COMMANDS: Mapping[str, CommandSpec] = {
    spec.name: spec
    for spec in (
        CommandSpec("status", False, "/status", "what is down, in a few lines"),
        CommandSpec(
            "agents", False, "/agents", "every agent: state, pid, uptime, restarts, errors"
        ),
        CommandSpec(
            "log", False, "/log [N]", f"the last N ledger entries (default 10, at most {100})"
        ),
        CommandSpec(
            "fleet", False, "/fleet", "every host of the fleet: its state and what is down"
        ),
        CommandSpec(
            "restart",
            True,
            "/restart AGENT[@NODE]",
            "restart an agent, here or on another node",
        ),
        CommandSpec(
            "switch",
            True,
            "/switch [TARGET]",
            "switch this host to a declared target behind safeswitch's gate; alone, lists "
            "the targets",
        ),
    )
}
READ_ONLY: tuple[str, ...] = tuple(name for name, spec in COMMANDS.items() if not spec.mutating)
ALWAYS = ("help", "start")  # answered for every allowed person, not configurable

LOG_DEFAULT = 10
LOG_MAX = 100
MAX_CONFIRM_TIMEOUT = 60.0
DENIAL_RECORD_EVERY = 600.0  # seconds between two records of one stranger's attempts
DENIAL_RECORDS = (20, 30.0)  # strangers recorded at once, then one per this many seconds
MAX_PENDING = 64  # confirmations waiting at once, all people together
MAX_PENDING_PER_USER = 4
REMEMBER = 1024  # used and expired confirmations remembered, to answer a replay precisely

_TARGET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")

_COMMAND = re.compile(r"/([A-Za-z0-9_]{1,32})(?:@([A-Za-z0-9_]{1,64}))?\Z")
_CALLBACK = re.compile(r"(ok|no):([A-Za-z0-9_-]{22})\Z")


@dataclass(frozen=True)
class Policy:
    """What the host allows (from chat.json)."""

    allowed_users: frozenset[int]
    commands: frozenset[str]  # enabled, from COMMANDS
    host: str
    confirm_timeout: float = MAX_CONFIRM_TIMEOUT
    max_age: float = 300.0
    burst: int = 8  # commands a person may send at once...
    refill: float = 3.0  # ...then one per this many seconds

    def __post_init__(self) -> None:
        unknown = self.commands - set(COMMANDS)
        if unknown:
            raise ValueError(f"unknown commands: {sorted(unknown)}")
        if not 0 < self.confirm_timeout <= MAX_CONFIRM_TIMEOUT:
            raise ValueError(f"confirm_timeout must be in (0, {MAX_CONFIRM_TIMEOUT:g}]")


# --- what the core asks the shell to do ---------------------------------------------


@dataclass(frozen=True)
class Request:
    """A command from an allowed person, checked and ready to run."""

    user: int
    user_name: str
    chat: int
    chat_type: str
    message_id: int
    command: str
    args: tuple[str, ...] = ()

    @property
    def private(self) -> bool:
        return self.chat_type == "private"


@dataclass(frozen=True)
class Say:
    """A message to a chat (through the outbox, which keeps Telegram's limits)."""

    chat: int
    group: bool
    text: str
    filename: str = "keel.txt"  # the file's name if the text is too long for a message
    reply_to: int | None = None
    buttons: tuple[tuple[str, str], ...] = ()  # (label, callback_data)
    confirmation: str | None = None  # the nonce whose buttons this is (see ChatCore.shown)


@dataclass(frozen=True)
class Edit:
    """Replace the text of a message the bot sent, dropping its buttons."""

    chat: int
    message_id: int
    text: str


@dataclass(frozen=True)
class AnswerButton:
    """``answerCallbackQuery``: stops the spinner; ``text`` shows only to the presser."""

    callback_id: str
    text: str = ""


@dataclass(frozen=True)
class Record:
    """A ledger entry (metadata only: ids, names, states; never a token or a nonce)."""

    kind: str
    subject: str
    data: Mapping[str, Any]


@dataclass(frozen=True)
class Note:
    """A line for the daemon's log that is not worth a ledger entry."""

    text: str


@dataclass(frozen=True)
class Query:
    """Run the read-only command of ``request`` and :class:`Say` what it gives."""

    request: Request


@dataclass(frozen=True)
class Propose:
    """Look up ``target``'s state, then call :meth:`ChatCore.offer` (or say why not)."""

    request: Request
    action: str
    target: str


@dataclass(frozen=True)
class Execute:
    """Record ``approval`` durably, then carry ``pending`` out, then :meth:`ChatCore.finished`.

    If the approval cannot be recorded, nothing is done: an action from a chat
    that leaves no trace is exactly what a stolen phone would want.
    """

    pending: Pending
    approval: Record


Effect = Say | Edit | AnswerButton | Record | Note | Query | Propose | Execute


# --- confirmations ------------------------------------------------------------------


@dataclass
class Pending:
    """A confirmation on offer: bound to person, chat, action, target and shown state."""

    id: str  # public ("c7"): in records and logs
    nonce: str  # private: only in the buttons' callback_data
    request: Request
    action: str
    target: str
    state: str  # the fingerprint of what the person was shown
    text: str  # the message they were shown
    created: float
    expires: float
    message_id: int | None = None  # known once the message went out


@dataclass(frozen=True)
class Outcome:
    """How an executed action ended: ``done``, ``refused`` (nothing changed) or ``failed``."""

    result: Literal["done", "refused", "failed"]
    text: str
    data: Mapping[str, Any] = field(default_factory=dict)  # more for the record (a switch's ids)


class _Bucket:
    """A token bucket: ``burst`` at once, then one per ``refill`` seconds."""

    def __init__(self, burst: int, refill: float, now: float) -> None:
        self.tokens = float(burst)
        self.burst = burst
        self.refill = refill
        self.at = now
        self.noticed = False  # the "slow down" notice went out for this empty spell

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) / self.refill)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.noticed = False
            return True
        return False

    def wait(self) -> float:
        return (1 - self.tokens) * self.refill


@dataclass
class Stats:
    updates: int = 0
    commands: int = 0
    denied: int = 0
    throttled: int = 0
    stale: int = 0
    offered: int = 0
    approved: int = 0
    cancelled: int = 0
    expired: int = 0
    refused_presses: int = 0
    counts: dict[str, int] = field(default_factory=dict)


class ChatCore:
    """The decisions of keel chat. One per bot; not thread-safe (one event loop feeds it)."""

    def __init__(
        self,
        policy: Policy,
        *,
        clock: Callable[[], float],
        wall: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.wall = wall
        self.rng = rng
        self.username: str | None = None  # the bot's own, once getMe told it
        self.stats = Stats()
        self._pending: dict[str, Pending] = {}  # by nonce
        # nonce -> why it ended ("used", "expired", "superseded") and its last words
        self._gone: OrderedDict[str, tuple[str, Pending, str]] = OrderedDict()
        self._in_flight: set[tuple[str, str]] = set()  # (action, target) being carried out
        self._buckets: OrderedDict[int, _Bucket] = OrderedDict()
        self._denials: OrderedDict[int, float] = OrderedDict()  # stranger -> last record
        self._denial_records = _Bucket(*DENIAL_RECORDS, now=clock())  # all strangers together
        self._serial = 0

    # --- updates --------------------------------------------------------------------

    def handle(self, update: Update) -> list[Effect]:
        """Decide what one update from ``getUpdates`` leads to."""
        self.stats.updates += 1
        if update.message is not None:
            return self._message(update.message)
        if update.callback_query is not None:
            return self._press(update.callback_query)
        return []

    def _allowed(self, user_id: int, is_bot: bool) -> bool:
        return not is_bot and user_id in self.policy.allowed_users

    def _denied(self, user_id: int, name: str, chat: int | None, what: str) -> list[Effect]:
        """A stranger: no answer; a record (and a log line) at most every 10 minutes.

        Many strangers at once (a large group) are recorded at a bounded pace:
        past it they are only counted (``stats.denied``), so no crowd can fill
        the ledger or the log.
        """
        self.stats.denied += 1
        now = self.clock()
        last = self._denials.get(user_id)
        if last is not None and now - last < DENIAL_RECORD_EVERY:
            return []
        if not self._denial_records.take(now):
            return []
        self._denials[user_id] = now
        self._denials.move_to_end(user_id)
        while len(self._denials) > REMEMBER:
            self._denials.popitem(last=False)
        return [
            Note(
                f"ignored {what} from user {user_id} ({name or 'no name'}) in chat {chat}: "
                "not in allowed_users (further attempts are not logged for 10 minutes)"
            ),
            Record("chat_denied", str(user_id), {"chat": chat, "what": what}),
        ]

    def _admit(self, user_id: int) -> Literal["ok", "notice", "silent"]:
        now = self.clock()
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = _Bucket(self.policy.burst, self.policy.refill, now)
        self._buckets.move_to_end(user_id)
        while len(self._buckets) > REMEMBER:
            self._buckets.popitem(last=False)
        if bucket.take(now):
            return "ok"
        self.stats.throttled += 1
        if bucket.noticed:
            return "silent"
        bucket.noticed = True
        return "notice"

    def _message(self, message: Message) -> list[Effect]:
        sender, chat = message.sender, message.chat
        if sender is None:
            return []  # a channel post or a message sent as a chat: nobody to authorize
        command = _parse_command(message.text or "")
        if command is not None and command[1] is not None and command[1] != self.username:
            return []  # "/status@other_bot": for another bot in the group
        if not self._allowed(sender.id, sender.is_bot):
            what = f"/{command[0]}" if command else "a message"
            return self._denied(sender.id, sender.name, chat.id, what)
        group = not chat.private
        if command is None:
            if group:
                return []  # talk among people in a group is not for the bot
            return [Say(chat.id, False, "I only take commands. /help lists them.")]
        name, _, args = command
        age = self.wall() - message.date
        if message.date and age > self.policy.max_age:
            self.stats.stale += 1
            return [
                Note(
                    f"skipped /{name} from user {sender.id}: sent {age:.0f} s ago, "
                    f"more than max_age ({self.policy.max_age:g} s)"
                )
            ]
        admitted = self._admit(sender.id)
        if admitted == "silent":
            return []
        if admitted == "notice":
            wait = self._buckets[sender.id].wait()
            return [
                Say(
                    chat.id,
                    group,
                    f"Too many commands at once: I ignore yours for the next {wait:.0f} s.",
                    reply_to=message.message_id,
                ),
                Note(f"user {sender.id}: too many commands; ignoring them for {wait:.0f} s"),
            ]
        request = Request(
            sender.id, sender.name, chat.id, chat.type, message.message_id, name, tuple(args)
        )
        return self._command(request)

    def _command(self, request: Request) -> list[Effect]:
        name, group = request.command, not request.private
        self.stats.commands += 1
        self.stats.counts[name] = self.stats.counts.get(name, 0) + 1

        def say(text: str) -> list[Effect]:
            return [Say(request.chat, group, text, reply_to=request.message_id)]

        if name in ALWAYS:
            return say(self.help_text(private=request.private))
        spec = COMMANDS.get(name)
        if spec is None:
            return say(f"There is no /{name}. {self._listing(request.private)}")
        if name not in self.policy.commands:
            return say(
                f"/{name} is not enabled on {self.policy.host} (the `commands` of its chat "
                "config). " + self._listing(request.private)
            )
        if spec.mutating and not (request.private and request.chat == request.user):
            return [
                *say(f"/{name} changes things, so I take it only in a private chat with you."),
                _record(request, "chat_refused", reason="not a private chat"),
            ]
        problem, request = _check_args(spec, request)
        if problem is not None:
            return say(problem)
        record = _record(request, "chat_command")
        if not spec.mutating or not request.args:  # /switch alone lists the targets
            return [record, Query(request)]
        target = request.args[0]
        if self._busy(name, target):
            return say(f"A {name} of {target} is already under way; wait for its result.")
        return [record, Propose(request, name, target)]

    def _busy(self, action: str, target: str) -> bool:
        """Is an approved action on ``target`` under way (any switch: a host switches once)?"""
        if action == "switch":
            return any(a == "switch" for a, _ in self._in_flight)
        return (action, target) in self._in_flight

    # --- confirmations ------------------------------------------------------------------

    def offer(
        self, request: Request, action: str, target: str, state: str, shown: str
    ) -> list[Effect]:
        """The target is in ``state`` (``shown`` to the person): ask them to confirm."""
        now = self.clock()
        effects: list[Effect] = []
        mine = [p for p in self._pending.values() if p.request.user == request.user]
        for old in list(mine):
            if (old.action, old.target) == (action, target):
                effects += self._close(
                    old, "superseded", "Superseded by a newer confirmation.", "chat_supersede"
                )
                mine.remove(old)
        if len(mine) >= MAX_PENDING_PER_USER or len(self._pending) >= MAX_PENDING:
            return [
                *effects,
                Say(
                    request.chat,
                    False,
                    "Too many confirmations are waiting; answer or let them expire first.",
                    reply_to=request.message_id,
                ),
            ]
        self._serial += 1
        nonce = base64.urlsafe_b64encode(self.rng.getrandbits(128).to_bytes(16, "big")).decode()
        nonce = nonce.rstrip("=")
        timeout = self.policy.confirm_timeout
        changes = f"the running system or {target}" if action == "switch" else target
        where = "" if "@" in target else f" on {self.policy.host}"  # AGENT@NODE names it
        text = (
            f"{_ACTION_TITLES[action]} {target}{where}?\n"
            f"Now: {shown}\n"
            f"Only you can answer, once, within {timeout:g} s; if {changes} changes before "
            "you do, nothing is done."
        )
        pending = Pending(
            id=f"c{self._serial}",
            nonce=nonce,
            request=request,
            action=action,
            target=target,
            state=state,
            text=text,
            created=now,
            expires=now + timeout,
        )
        self._pending[nonce] = pending
        self.stats.offered += 1
        return [
            *effects,
            Say(
                request.chat,
                False,
                text,
                reply_to=request.message_id,
                buttons=(
                    (f"{_ACTION_TITLES[action]} {target}", f"ok:{nonce}"),
                    ("Cancel", f"no:{nonce}"),
                ),
                confirmation=nonce,
            ),
            Record(
                "chat_confirm",
                str(request.user),
                {
                    "id": pending.id,
                    "action": action,
                    "target": target,
                    "state": state,
                    "chat": request.chat,
                    "expires_in": timeout,
                },
            ),
        ]

    def shown(self, nonce: str, message_id: int) -> list[Effect]:
        """The confirmation went out as ``message_id`` (so it can be edited later).

        If it already ended before Telegram said so (answered or expired while
        the message was on its way), the message is edited now: no buttons
        stay on screen that look alive.
        """
        pending = self._pending.get(nonce)
        if pending is not None:
            pending.message_id = message_id
            return []
        gone = self._gone.get(nonce)
        if gone is None:
            return []
        _, ended, last_words = gone
        ended.message_id = message_id
        return [Edit(ended.request.chat, message_id, f"{ended.text}\n\n{last_words}")]

    def _press(self, query: CallbackQuery) -> list[Effect]:
        sender = query.sender
        message = query.message
        chat = message.chat if message is not None else None
        if not self._allowed(sender.id, sender.is_bot):
            return self._denied(sender.id, sender.name, chat.id if chat else None, "a button press")
        if self._admit(sender.id) != "ok":
            return []  # a flood of presses: not even answered
        match = _CALLBACK.match(query.data or "")
        if match is None:
            return [AnswerButton(query.id, "This button is not one of mine.")]
        verb, nonce = match.groups()
        pending = self._pending.get(nonce)
        if pending is None:
            ended = self._gone.get(nonce)
            gone = ended[0] if ended is not None else ""
            self.stats.refused_presses += 1
            text = {
                "used": "This confirmation was already answered; it works once.",
                "expired": "This confirmation expired; nothing was done. Send the command again.",
                "superseded": "A newer confirmation replaced this one.",
            }.get(gone or "", "This confirmation is unknown here (keel chat restarted since?).")
            return [
                AnswerButton(query.id, text),
                Record(
                    "chat_press_refused",
                    str(sender.id),
                    {"reason": gone or "unknown", "chat": chat.id if chat else None},
                ),
            ]
        request = pending.request
        if sender.id != request.user or chat is None or chat.id != request.chat or not chat.private:
            self.stats.refused_presses += 1
            return [
                AnswerButton(
                    query.id, "This confirmation is not yours; it stays open for its owner."
                ),
                Record(
                    "chat_press_refused",
                    str(sender.id),
                    {
                        "reason": "not yours",
                        "id": pending.id,
                        "owner": request.user,
                        "chat": chat.id if chat else None,
                    },
                ),
            ]
        if self.clock() >= pending.expires:
            return [
                AnswerButton(query.id, "This confirmation expired; nothing was done."),
                *self._expire(pending),
            ]
        if verb == "no":
            self.stats.cancelled += 1
            return [
                AnswerButton(query.id, "Cancelled."),
                *self._close(pending, "used", "Cancelled: nothing was done.", "chat_cancel"),
            ]
        if self._busy(pending.action, pending.target):
            # Another approved one is under way: this one's state is about to change anyway.
            self.stats.refused_presses += 1
            busy = f"A {pending.action} of {pending.target} is already under way; nothing more was done."
            return [
                AnswerButton(query.id, busy),
                *self._close(pending, "used", busy, "chat_press_refused", reason="busy"),
            ]
        # Approved: single use from here on, whatever the action's outcome.
        self.stats.approved += 1
        working = "Approved; working on it."
        self._forget(pending, "used", working)
        self._in_flight.add((pending.action, pending.target))
        effects: list[Effect] = [
            AnswerButton(query.id, f"Approved: {pending.action} {pending.target}.")
        ]
        if pending.message_id is not None:
            effects.append(Edit(request.chat, pending.message_id, f"{pending.text}\n\n{working}"))
        approval = Record(
            "chat_approve",
            str(request.user),
            {
                "id": pending.id,
                "action": pending.action,
                "target": pending.target,
                "state": pending.state,
                "chat": request.chat,
                "after": round(self.clock() - pending.created, 3),
            },
        )
        effects.append(Execute(pending, approval))
        return effects

    def finished(self, pending: Pending, outcome: Outcome) -> list[Effect]:
        """An executed action ended: tell the person and the ledger."""
        self._in_flight.discard((pending.action, pending.target))
        request = pending.request
        return [
            Say(
                request.chat, False, outcome.text, reply_to=pending.message_id or request.message_id
            ),
            Record(
                "chat_action",
                str(request.user),
                {
                    "id": pending.id,
                    "action": pending.action,
                    "target": pending.target,
                    "result": outcome.result,
                    "detail": outcome.text[:300],
                    **outcome.data,
                },
            ),
        ]

    def tick(self) -> list[Effect]:
        """Expire the confirmations whose time is up."""
        now = self.clock()
        effects: list[Effect] = []
        for pending in [p for p in self._pending.values() if now >= p.expires]:
            effects += self._expire(pending)
        return effects

    def next_deadline(self) -> float | None:
        return min((p.expires for p in self._pending.values()), default=None)

    @property
    def pending(self) -> list[Pending]:
        return sorted(self._pending.values(), key=lambda p: p.created)

    def _expire(self, pending: Pending) -> list[Effect]:
        self.stats.expired += 1
        return self._close(pending, "expired", "Expired: nothing was done.", "chat_expire")

    def _close(
        self, pending: Pending, why: str, text: str, kind: str, **extra: Any
    ) -> list[Effect]:
        """End a confirmation that will not be carried out: its record, and its message edited."""
        self._forget(pending, why, text)
        request = pending.request
        data = {"id": pending.id, "action": pending.action, "target": pending.target, **extra}
        effects: list[Effect] = [Record(kind, str(request.user), data)]
        if pending.message_id is not None:
            effects.append(Edit(request.chat, pending.message_id, f"{pending.text}\n\n{text}"))
        return effects

    def _forget(self, pending: Pending, why: str, last_words: str) -> None:
        self._pending.pop(pending.nonce, None)
        self._gone[pending.nonce] = (why, pending, last_words)
        while len(self._gone) > REMEMBER:
            self._gone.popitem(last=False)

    # --- help ---------------------------------------------------------------------

    def _listing(self, private: bool) -> str:
        names = [
            n
            for n in COMMANDS
            if n in self.policy.commands and (private or not COMMANDS[n].mutating)
        ]
        return "Commands here: " + " ".join(f"/{n}" for n in names) + " /help"

    def help_text(self, *, private: bool) -> str:
        lines = [f"keel chat on {self.policy.host}. Commands:"]
        for name, spec in COMMANDS.items():
            if name not in self.policy.commands:
                continue
            suffix = " (private chat only; asks you to confirm)" if spec.mutating else ""
            lines.append(f"{spec.usage}: {spec.summary}{suffix}")
        if not any(COMMANDS[n].mutating for n in self.policy.commands):
            lines.append("This host takes read-only commands only.")
        elif not private:
            lines.append("Commands that change things work only in a private chat with me.")
        return "\n".join(lines)


_ACTION_TITLES = {"restart": "Restart", "switch": "Switch to"}


def _record(request: Request, kind: str, **extra: Any) -> Record:
    data: dict[str, Any] = {
        "chat": request.chat,
        "chat_type": request.chat_type,
        "command": request.command,
        "args": list(request.args),
    }
    data.update(extra)
    return Record(kind, str(request.user), data)


def _parse_command(text: str) -> tuple[str, str | None, list[str]] | None:
    """``"/restart@keel_bot web"`` -> ``("restart", "keel_bot", ["web"])``; None if no command."""
    words = text.split()
    if not words or not words[0].startswith("/"):
        return None
    match = _COMMAND.match(words[0])
    if match is None:
        return None
    return match.group(1).lower(), match.group(2), words[1:]


def _check_args(spec: CommandSpec, request: Request) -> tuple[str | None, Request]:
    """The arguments of ``request`` for ``spec``: (a usage message, or None; the request)."""
    args = request.args
    usage = f"Usage: {spec.usage}"
    if spec.name == "log":
        if not args:
            return None, _with_args(request, (str(LOG_DEFAULT),))
        if len(args) == 1 and args[0].isdigit() and 1 <= int(args[0]) <= LOG_MAX:
            return None, _with_args(request, (str(int(args[0])),))
        return f"{usage}: N is a number from 1 to {LOG_MAX}.", request
    if spec.name == "restart":
        if len(args) == 1 and _TARGET.match(args[0]):
            return None, request
        return (
            f"{usage}: one agent name, or AGENT@NODE for another node (letters, digits, "
            "'_', '.', '@', '-').",
            request,
        )
    if spec.name == "switch":
        if not args or (len(args) == 1 and _SWITCH_TARGET.match(args[0])):
            return None, request
        return (
            f"{usage}: one target's name (up to 32 letters, digits, '_', '.', '-'); "
            "/switch alone lists them.",
            request,
        )
    if args:
        return f"{usage} (it takes no arguments).", request
    return None, request


def _with_args(request: Request, args: tuple[str, ...]) -> Request:
    return Request(
        request.user,
        request.user_name,
        request.chat,
        request.chat_type,
        request.message_id,
        request.command,
        args,
    )
