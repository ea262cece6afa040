"""keel mesh: encrypted peer-to-peer messaging between keel hosts.

The cryptographic core, pure and sans-I/O (see ``README-api.md`` beside this
file and ``docs/mesh-protocol.md`` for the wire format):

- ``kem``: ML-KEM-768 behind a small interface (``cryptography`` or ``oqs``).
- ``noise``: the Noise framework with the hfs extension (CipherState,
  SymmetricState, HandshakeState).
- ``identity``: the node's X25519 static key, Ed25519 signing key and node id.
- ``invite``: invite tokens and the proof a joiner gives in the handshake.
- ``framing`` and ``session``: the secure channel, h11-style: bytes in,
  events out, bytes to send back; the daemon's shell does the I/O.
"""
