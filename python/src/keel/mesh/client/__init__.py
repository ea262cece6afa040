"""The Python client agents use to talk through their local mesh daemon.

::

    from keel.mesh.client import MeshClient

    mesh = MeshClient()                    # the daemon at /run/keel/mesh.sock
    message_id = mesh.send(peer_id, "jobs", b"hello")
    for message in mesh.recv("jobs", wait=5):
        print(message.sender, message.data)

    with mesh.sender() as out:             # pipelined: many messages per request
        for item in work:
            out.send(peer_id, "jobs", item)  # queued durably once the block ends
    with mesh.subscribe("jobs") as inbox:  # pushed as they arrive
        for message in inbox.recv(wait=5):
            handle(message)

Payloads travel as raw bytes on a binary stream (``keel.mesh.local``):
``transport`` (the stream on an upgraded :class:`keel.api.Connection`),
``sender`` (pipelined sending, riding out back-pressure and restarts),
``subscription`` (messages pushed as they arrive); status, membership and
rooms use the JSON control verbs (``mesh_client``). Failures are
:class:`keel.errors.ApiError` subclasses, told apart by type:
``Unavailable`` (try again later), ``Refused`` (and :class:`SendRefused`,
with the ids not queued), ``BadRequest``. Importing this package loads no
cryptographic module.

**Exactly once.** The daemon hands out received messages under a lease and
deletes them only when the client acknowledges them. ``recv`` acknowledges
the previous batch when it fetches the next one (or call ``ack``), and the
client remembers the ids it has returned: a message the daemon hands out
again (its daemon was killed before the acknowledgement arrived, or a lease
ran out) is acknowledged and not returned a second time. So, for the
lifetime of one client, every message is returned once. A client that dies
between receiving and acknowledging gets the message again in its next life
(at-least-once across client crashes: keep the id if that matters).
"""

from keel.mesh.client.mesh_client import MeshClient
from keel.mesh.client.messages import Received
from keel.mesh.client.sender import Sender, SendRefused
from keel.mesh.client.subscription import Subscription

__all__ = ["MeshClient", "Received", "SendRefused", "Sender", "Subscription"]
