# Three keel mesh nodes on one network in NixOS VMs: pairing by invite,
# membership by gossip, messages in every direction, delivery across a
# killed daemon, a room, and a removed node refused.
{ pkgs, lib, ... }:
let
  node = {
    # Quick reconnects, for a test that kills daemons (lib/mesh-node.nix).
    imports = [ ./lib/mesh-node.nix ];
    environment.systemPackages = [ pkgs.jq ];
  };
in
{
  name = "keel-mesh";

  nodes = {
    a = node;
    b = node;
    c = node;
  };

  testScript =
    { nodes, ... }:
    ''
      import json

      hosts = {"a": a, "b": b, "c": c}
      # Each node listens on its own address only (services.keel.mesh.listen),
      # so the port is awaited there: wait_for_open_port() alone probes
      # localhost, where nothing listens, until it times out.
      addresses = {
          "a": "${nodes.a.networking.primaryIPAddress}",
          "b": "${nodes.b.networking.primaryIPAddress}",
          "c": "${nodes.c.networking.primaryIPAddress}",
      }

      start_all()
      for name, machine in hosts.items():
          machine.wait_for_unit("keel-mesh.service")
          machine.wait_for_open_port(7400, addresses[name])

      ids = {name: m.succeed("keel mesh id").strip() for name, m in hosts.items()}


      def connected(machine, peer: str) -> None:
          machine.wait_until_succeeds(
              f"keel mesh peers --json | jq -e '.[] | select(.id == \"{ids[peer]}\") | .connected'",
              timeout=60,
          )


      def send(sender: str, receiver: str, topic: str, data: str) -> None:
          hosts[sender].succeed(f"keel mesh send {ids[receiver]} --topic {topic} '{data}'")


      def received(receiver: str, topic: str, count: int) -> list:
          lines = hosts[receiver].succeed(
              f"keel mesh recv --topic {topic} --count {count} --timeout 60 --json"
          ).splitlines()
          return [json.loads(line) for line in lines]


      with subtest("the node runs as its own user and keeps its identity private"):
          assert a.succeed("stat -c %U /var/lib/keel/mesh/identity.key").strip() == "keel-mesh"
          assert a.succeed("stat -c %a /var/lib/keel/mesh/identity.key").strip() == "600"
          a.succeed("test -S /run/keel/mesh.sock")
          a.succeed("jq -e .listen /etc/keel/mesh.json")
          a.fail("test -e /var/lib/keel/mesh/config.json")

      with subtest("b joins a's mesh with a single-use invite"):
          token = a.succeed("keel mesh invite --ttl 300 --uses 1").strip()
          b.succeed(f"keel mesh join {token}")
          connected(a, "b")
          c.fail(f"keel mesh join {token}")

      with subtest("c, invited by b, learns a by gossip and connects to it"):
          token = b.succeed("keel mesh invite").strip()
          c.succeed(f"keel mesh join {token}")
          connected(c, "a")
          connected(a, "c")

      with subtest("messages go every way, each delivered once"):
          for sender in hosts:
              for receiver in hosts:
                  if sender != receiver:
                      send(sender, receiver, "hello", f"from {sender} to {receiver}")
          for receiver in hosts:
              got = sorted(m["data"] for m in received(receiver, "hello", 2))
              senders = sorted(s for s in hosts if s != receiver)
              assert got == [f"from {s} to {receiver}" for s in senders], got

      with subtest("messages queued while the receiver's daemon is dead arrive once it is back"):
          c.succeed("systemctl kill --signal=KILL keel-mesh.service")
          for n in range(5):
              send("a", "c", "queued", f"message {n}")
          c.wait_for_unit("keel-mesh.service")
          got = sorted(m["data"] for m in received("c", "queued", 5))
          assert got == [f"message {n}" for n in range(5)], got
          c.fail("keel mesh recv --topic queued --count 1 --timeout 3 --json")

      with subtest("a room fans a message out to its members"):
          room = a.succeed(f"keel mesh room create ops {ids['b']} {ids['c']}").strip()
          a.succeed(f"keel mesh room send {room} --topic chat 'standup'")
          for receiver in ("b", "c"):
              (message,) = received(receiver, "chat", 1)
              assert message["data"] == "standup" and message["from"] == ids["a"], message

      with subtest("a removed node is refused by everyone"):
          a.succeed(f"keel mesh remove {ids['c']}")
          b.wait_until_succeeds(
              f"keel mesh peers --json | jq -e 'all(.[]; .id != \"{ids['c']}\" or (.connected | not))'",
              timeout=60,
          )
          c.succeed(f"keel mesh send {ids['b']} --topic after-removal 'still here?'")
          b.fail("keel mesh recv --topic after-removal --count 1 --timeout 10")

      with subtest("the ledger holds the metadata and verifies"):
          a.succeed("keel ledger verify")
          entries = a.succeed("keel ledger tail -n 200 --json")
          assert "from a to b" not in entries, "a payload reached the ledger"
    '';
}
