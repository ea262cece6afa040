"""keel chat: steer keel from a Telegram chat, safely (docs/chat.md).

Layers, from the bottom up:

- ``core``: the pure core. Authorizes the person (never the chat) on every
  update, parses keel's typed commands, runs the confirmation life cycle
  (single use, bound to person, action, target and state, expiring) and
  limits each person's pace. Updates in, effects out; time is a parameter.
- ``outbox``: the pure core of sending: Telegram's rate limits per chat, per
  group and overall, 429 holds, and replies laid out as a message or a file.
- ``verbs``: what the chat asks of keel (:class:`~keel.chat.verbs.Verbs`) and
  its implementation on this host (watch's control socket, the ledger); the
  fleet's verbs plug in beside it.
- ``views``: the read-only commands' answers as plain text.
- ``daemon``: the asyncio shell on :mod:`keel.service`: long polling,
  sending, timers, the verbs. The Bot API's wire is :mod:`keel.telegram`,
  shared with watch's alerts.
- ``cli``: ``keel chat serve|check-config|status``.
"""
