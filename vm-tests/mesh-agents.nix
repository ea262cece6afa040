# The mesh's agents as identities, on two keel hosts in NixOS VMs, every
# grant declared through services.keel.agents.<name>.mesh only. Each agent's
# commands run under its own uid (runuser), on the agents' socket
# /run/keel-mesh/agents.sock (the node's control socket is for root, the
# node's daemons and its operators; a tier-2 sandbox does not even see it):
# whoami per agent; an agent neither reads nor acknowledges another's
# message; a tier-2 agent without a grant has no mesh, also from its own
# sandbox; a message to AGENT@NODE reaches that agent only; receiveFrom keeps
# a message from an unlisted sender from the agent (the ledger says so) and
# leaves it to the node's other readers; sendTo AGENT@NODE allows that agent
# only; a room with agent members, before and after an agent's removal; and
# all of it again after the daemons restart.
{ pkgs, lib, ... }:
let
  # Both nodes' mesh identities are fixed, so that grants can name them at
  # build time (test keys: their private halves are in the Nix store).
  # python/tests/nix/test_vm_tests.py checks that each id is its key's.
  aId = "s6hmrrkb2egujeco2g3gheeali2dyrsm";
  aKey = pkgs.writeText "mesh-agents-test-a-identity.key" ''
    {
     "version": 1,
     "node_id": "s6hmrrkb2egujeco2g3gheeali2dyrsm",
     "static_private": "9b0fd8f391f73989fc4a62b796847122c8f54281d5324f109993f2428f739040",
     "signing_private": "8e1699e18e96b9614fcee6de2b85d1330a0099dd2789d1b19bf0e8f5849c9bc3"
    }
  '';
  bId = "wp5nke5md2bzlz2luecun3xx6zyb4kvk";
  bKey = pkgs.writeText "mesh-agents-test-b-identity.key" ''
    {
     "version": 1,
     "node_id": "wp5nke5md2bzlz2luecun3xx6zyb4kvk",
     "static_private": "79db28338251e75d36bac7e8f1e7d3667374bcab5974cad9ed9d0f7b9b3b9ae7",
     "signing_private": "4fa48abf6d1adadd55a313ee8bc0679723c4df73cde1727a8265c83afbc0e22e"
    }
  '';

  idle = [
    (lib.getExe' pkgs.coreutils "sleep")
    "infinity"
  ];

  # One request on the agents' socket (keel.api's JSON lines), as the caller's
  # uid: prints the daemon's answer line, {"ok": true, "result": ...} or
  # {"ok": false, "error": ..., "kind": ...}. For the verbs `keel mesh` has no
  # command for (`ack`, `recv` with a lease and no acknowledgement).
  meshCallScript = pkgs.writeText "mesh-call.py" ''
    import json
    import socket
    import sys

    verb = sys.argv[1]
    args = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(90)
        s.connect("/run/keel-mesh/agents.sock")
        s.sendall(json.dumps({"verb": verb, "args": args}).encode() + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                sys.exit("the daemon hung up")
            reply += chunk
    print(reply.decode().strip())
  '';
  meshCall = pkgs.writeShellScriptBin "mesh-call" ''
    exec ${lib.getExe pkgs.python3} ${meshCallScript} "$@"
  '';

  node = {
    imports = [ ./lib/mesh-node.nix ];
    # Tier 2 needs keel egress; there is no resolver in the test network
    # (the agents here reach no name: the mesh is the point).
    services.keel.egress = {
      enable = true;
      upstream = [ "192.0.2.53" ];
    };
    environment.systemPackages = [
      pkgs.jq
      meshCall
    ];
  };
in
{
  name = "keel-mesh-agents";

  nodes = {
    a =
      { config, ... }:
      {
        imports = [
          node
          (import ./lib/fixed-identity.nix aKey)
        ];
        services.keel.agents = {
          # The operator's automation: the tiers' default grant, everything.
          ops = {
            tier = 0;
            command = idle;
          };
          # Sends to one agent of b only, on its two topics; reads from anyone.
          worker = {
            tier = 1;
            command = idle;
            mesh = {
              sendTo = [ "reporter@${bId}" ];
              topics = [
                "reports.*"
                "chat"
              ];
            };
          };
          # Untrusted and granted nothing: no mesh. It tries from its own
          # sandbox and writes down what it got.
          sandbox = {
            tier = 2;
            command = [
              (lib.getExe (
                pkgs.writeShellScriptBin "mesh-from-the-sandbox" ''
                  keel=${lib.getExe config.services.keel.package}
                  # Tier 2 hides keel's own sockets: /run/keel is an empty directory
                  # of mode 000 here (InaccessiblePaths).
                  stat -c %a /run/keel > run-keel-mode
                  # The node may still be starting (nothing orders it before the
                  # agents): its agents' socket answers once it is up.
                  tries=0
                  until $keel mesh whoami --socket /run/keel-mesh/agents.sock --json > whoami.json; do
                    tries=$((tries + 1))
                    if [ "$tries" -ge 120 ]; then break; fi
                    sleep 1
                  done
                  $keel mesh send --socket /run/keel-mesh/agents.sock ${bId} --topic reports.daily 'from the sandbox' > send.out 2>&1
                  echo $? > send.rc
                  touch done
                  exec sleep infinity
                ''
              ))
            ];
          };
        };
      };

    b = {
      imports = [
        node
        (import ./lib/fixed-identity.nix bKey)
      ];
      services.keel.agents = {
        # Reads reports from worker on a, and from nobody else.
        reporter = {
          tier = 1;
          command = idle;
          mesh = {
            receiveFrom = [ "worker@${aId}" ];
            topics = [ "reports.*" ];
          };
        };
        # Two agents with the tiers' default grant (everything): what one
        # may not take from the other is the agents' own.
        reader = {
          tier = 1;
          command = idle;
        };
        clerk = {
          tier = 1;
          command = idle;
        };
        # Untrusted, granted one topic with ops on a.
        intake = {
          tier = 2;
          command = idle;
          mesh = {
            sendTo = [ "ops@${aId}" ];
            receiveFrom = [ "ops@${aId}" ];
            topics = [ "intake" ];
          };
        };
      };
    };
  };

  testScript =
    { nodes, ... }:
    ''
      import json
      import shlex

      hosts = {"a": a, "b": b}
      # Each node listens on its own address only (services.keel.mesh.listen).
      addresses = {
          "a": "${nodes.a.networking.primaryIPAddress}",
          "b": "${nodes.b.networking.primaryIPAddress}",
      }
      ids = {"a": "${aId}", "b": "${bId}"}
      a_id, b_id = ids["a"], ids["b"]
      agents = {"a": ["ops", "worker", "sandbox"], "b": ["reporter", "reader", "clerk", "intake"]}
      AGENTS_SOCKET = "/run/keel-mesh/agents.sock"
      KEEL = "/run/current-system/sw/bin/keel"
      EVERYTHING: dict[str, list[str]] = {"sendTo": ["*"], "receiveFrom": ["*"], "topics": ["*"]}
      # Each agent's tier and grant as the module declares them, the tiers'
      # defaults filled in key by key (docs/mesh.md, Agents).
      grants: dict[str, tuple[int, dict[str, list[str]]]] = {
          "ops": (0, EVERYTHING),
          "worker": (1, {"sendTo": [f"reporter@{b_id}"], "receiveFrom": ["*"], "topics": ["reports.*", "chat"]}),
          "sandbox": (2, {"sendTo": [], "receiveFrom": [], "topics": []}),
          "reporter": (1, {"sendTo": ["*"], "receiveFrom": [f"worker@{a_id}"], "topics": ["reports.*"]}),
          "reader": (1, EVERYTHING),
          "clerk": (1, EVERYTHING),
          "intake": (2, {"sendTo": [f"ops@{a_id}"], "receiveFrom": [f"ops@{a_id}"], "topics": ["intake"]}),
      }


      def as_agent(agent: str, command: str) -> str:
          return f"runuser -u keel-agent-{agent} -- {command}"


      def mesh(agent: str, verb: str, rest: str = "") -> str:
          """`keel mesh VERB` as the agent (its uid), on the agents' socket."""
          return as_agent(agent, f"{KEEL} mesh {verb} --socket {AGENTS_SOCKET} {rest}")


      def call(machine, agent: str, verb: str, args: dict) -> dict:
          """One request on the agents' socket as the agent: the daemon's answer."""
          line = machine.succeed(
              as_agent(agent, f"/run/current-system/sw/bin/mesh-call {verb} {shlex.quote(json.dumps(args))}"), timeout=120
          )
          return json.loads(line)


      def recv(machine, agent: str, topic: str, count: int = 1) -> list:
          """What the agent reads on `topic` (and acknowledges); fails after 60 s without it."""
          lines = machine.succeed(
              mesh(agent, "recv", f"--topic {topic} --count {count} --timeout 60 --json"), timeout=120
          ).splitlines()
          return [json.loads(line) for line in lines]


      def reads_nothing(machine, agent: str, topic: str) -> None:
          """The agent gets nothing on `topic` (the message is known to have arrived)."""
          machine.fail(mesh(agent, "recv", f"--topic {topic} --count 1 --timeout 5 --json"), timeout=60)


      def refused(machine, agent: str, verb: str, rest: str, why: str) -> None:
          """The agent's command fails, and says `why`."""
          out = machine.fail(mesh(agent, verb, rest) + " 2>&1", timeout=60)
          assert why in out, out


      def arrived(machine, message_id: str) -> None:
          """The node stored a peer's message (its received-batch entry names it)."""
          machine.wait_until_succeeds(
              f"keel ledger search {message_id} --source mesh --kind received-batch --json | grep -q .",
              timeout=60,
          )


      def recorded_refusal(machine, agent: str, verb: str, text: str) -> None:
          """A `mesh-refused` ledger entry of the agent's `verb` whose reason says `text`."""
          test = (
              f"any(.[]; .data.agent == {json.dumps(agent)} and .data.verb == {json.dumps(verb)}"
              f" and (.data.reason | contains({json.dumps(text)})))"
          )
          machine.wait_until_succeeds(
              f"keel ledger search {agent} --kind mesh-refused --json | jq -se {shlex.quote(test)}",
              timeout=60,
          )


      def connected(machine, peer: str) -> None:
          machine.wait_until_succeeds(
              f"keel mesh peers --json | jq -e '.[] | select(.id == \"{ids[peer]}\") | .connected'",
              timeout=60,
          )


      def up() -> None:
          for name, machine in hosts.items():
              machine.wait_for_unit("keel-mesh.service")
              machine.wait_for_open_port(7400, addresses[name])
              machine.wait_until_succeeds(f"test -S {AGENTS_SOCKET}", timeout=30)


      def whoami_checks() -> None:
          for name, machine in hosts.items():
              for agent in agents[name]:
                  me = json.loads(machine.succeed(mesh(agent, "whoami", "--json")))
                  tier, grant = grants[agent]
                  assert me["agent"] == agent and me["tier"] == tier, me
                  assert me["node"] == ids[name] and not me["operator"], me
                  assert {k: sorted(v) for k, v in me["mesh"].items()} == {k: sorted(v) for k, v in grant.items()}, me


      start_all()
      up()
      for name, machine in hosts.items():
          for agent in agents[name]:
              machine.wait_for_unit(f"keel-agent-{agent}.service")
      for name, machine in hosts.items():
          assert machine.succeed("keel mesh id").strip() == ids[name]

      with subtest("b joins a's mesh"):
          token = a.succeed("keel mesh invite --ttl 300").strip()
          b.succeed(f"keel mesh join {token}")
          connected(a, "b")
          connected(b, "a")

      with subtest("each agent is itself to the mesh, known by its uid, with its grant"):
          whoami_checks()
          root = json.loads(a.succeed("keel mesh whoami --json"))
          assert root["agent"] is None and root["mesh"] is None and root["operator"], root
          # An agent cannot pass for the node on the node's control socket...
          a.fail(as_agent("worker", f"{KEEL} mesh whoami --json"))
          # ...and a user that runs no agent is refused on the agents' socket.
          out = a.fail(f"runuser -u nobody -- {KEEL} mesh whoami --socket {AGENTS_SOCKET} 2>&1")
          assert "this socket is for the node's agents" in out, out
          # Each node names to the other the agents that may use the mesh.
          b.wait_until_succeeds(
              f"keel mesh agents --json | jq -e '[.[] | select(.node == \"{a_id}\") | .agent] | sort == [\"ops\", \"worker\"]'",
              timeout=60,
          )
          a.wait_until_succeeds(
              f"keel mesh agents --json | jq -e '[.[] | select(.node == \"{b_id}\") | .agent] | sort"
              " == [\"clerk\", \"intake\", \"reader\", \"reporter\"]'",
              timeout=60,
          )

      with subtest("a tier-2 agent without a grant has no mesh, from its sandbox too"):
          refused(a, "sandbox", "send", f"{b_id} --topic reports.daily 'hello'", "agent sandbox (tier 2")
          refused(a, "sandbox", "send", f"{b_id} --topic reports.daily 'hello'", "has no mesh")
          refused(a, "sandbox", "recv", "--topic reports.daily --timeout 1", "has no mesh")
          # Its own unit, in the tier-2 sandbox: /run/keel (the node's socket)
          # is hidden, the agents' socket answers, and the node refuses it the mesh.
          a.wait_until_succeeds("test -e /var/lib/keel-agents/sandbox/done", timeout=180)
          assert a.succeed("stat -c %a /run/keel").strip() == "2770"
          mode = a.succeed("cat /var/lib/keel-agents/sandbox/run-keel-mode").strip()
          assert mode == "0", f"/run/keel in the tier-2 sandbox has mode {mode}"
          me = json.loads(a.succeed("cat /var/lib/keel-agents/sandbox/whoami.json"))
          assert me["agent"] == "sandbox" and me["tier"] == 2, me
          assert me["mesh"] == grants["sandbox"][1], me
          assert a.succeed("cat /var/lib/keel-agents/sandbox/send.rc").strip() != "0"
          assert "has no mesh" in a.succeed("cat /var/lib/keel-agents/sandbox/send.out")
          # (`keel mesh send` sends on the binary stream, which it may not open)
          recorded_refusal(a, "sandbox", "stream", "has no mesh")

      with subtest("a message to AGENT@NODE reaches that agent only"):
          message_id = a.succeed(mesh("worker", "send", f"reporter@{b_id} --topic reports.addressed 'for reporter'")).strip()
          arrived(b, message_id)
          # Neither another agent whose grant covers the topic nor the node
          # itself reads what is for reporter.
          reads_nothing(b, "reader", "reports.addressed")
          b.fail("keel mesh recv --topic reports.addressed --count 1 --timeout 5", timeout=60)
          (message,) = recv(b, "reporter", "reports.addressed")
          assert message["id"] == message_id and message["data"] == "for reporter", message
          assert message["from"] == a_id and message["agent"] == "worker", message

      with subtest("sendTo AGENT@NODE allows that agent only"):
          for to in (f"reader@{b_id}", b_id):
              refused(a, "worker", "send", f"{to} --topic reports.daily 'x'", f"may not send to {to}:")
          refused(a, "worker", "send", f"reporter@{b_id} --topic other 'x'", "may not use topic 'other'")
          recorded_refusal(a, "worker", "send", f"may not send to reader@{b_id}: its mesh.sendTo is 'reporter@{b_id}'")
          # The tier-2 agent with a grant: ops on a, on its topic, and nothing else.
          message_id = b.succeed(mesh("intake", "send", f"ops@{a_id} --topic intake 'for ops'")).strip()
          refused(b, "intake", "send", f"worker@{a_id} --topic intake 'x'", "may not send to worker@")
          refused(b, "intake", "send", f"{a_id} --topic intake 'x'", "may not send to")
          refused(b, "intake", "send", f"ops@{a_id} --topic reports.daily 'x'", "may not use topic")
          (message,) = recv(a, "ops", "intake")
          assert message["id"] == message_id and message["agent"] == "intake" and message["from"] == b_id, message

      with subtest("an agent neither reads nor acknowledges another agent's message"):
          message_id = a.succeed(f"keel mesh send reader@{b_id} --topic reports.private 'for reader only'").strip()
          arrived(b, message_id)
          reads_nothing(b, "clerk", "reports.private")
          # reader takes it with a lease, not acknowledging it: its receipt.
          got = call(b, "reader", "recv", {"topic": "reports.private", "max": 10, "wait": 30, "lease": 300})
          assert got["ok"], got
          (message,) = got["result"]["messages"]
          assert message["id"] == message_id, message
          receipt = message["receipt"]
          # clerk acknowledging that receipt deletes nothing...
          answer = call(b, "clerk", "ack", {"receipts": [receipt]})
          assert answer == {"ok": True, "result": {"acked": 0}}, answer
          # ...reader's own acknowledgement does.
          answer = call(b, "reader", "ack", {"receipts": [receipt]})
          assert answer == {"ok": True, "result": {"acked": 1}}, answer
          # A topic outside an agent's grant is refused outright.
          refused(b, "reporter", "recv", "--topic ops.secret --timeout 1", "may not use topic 'ops.secret'")

      with subtest("receiveFrom keeps an unlisted sender's message from the agent, for the node's other readers"):
          message_id = a.succeed(mesh("ops", "send", f"{b_id} --topic reports.daily 'from ops'")).strip()
          arrived(b, message_id)
          reads_nothing(b, "reporter", "reports.daily")
          recorded_refusal(b, "reporter", "read", f"is not given messages on 'reports.daily' from ops@{a_id}")
          (message,) = recv(b, "reader", "reports.daily")
          assert message["id"] == message_id and message["agent"] == "ops", message

      with subtest("a room with agent members: members read, others on the node do not, a removed agent is out"):
          room = a.succeed(f"keel mesh room create crew ops@{a_id} reader@{b_id} reporter@{b_id}").strip()
          b.wait_until_succeeds(f"keel mesh room members {room} --json | jq -e '.version >= 1'", timeout=60)
          message_id = a.succeed(mesh("ops", "room send", f"{room} --topic chat 'standup'")).strip()
          arrived(b, message_id)
          # clerk (every topic, from everyone) is no member: it reads nothing of the room.
          reads_nothing(b, "clerk", "chat")
          (message,) = recv(b, "reader", "chat")
          assert message["id"] == message_id and message["room"] == room and message["agent"] == "ops", message
          # worker, on the room's node a but not in it, may not send to it; clerk neither.
          refused(a, "worker", "room send", f"{room} --topic chat 'x'", "is not a member of room crew")
          refused(b, "clerk", "room send", f"{room} --topic chat 'x'", "is not a member of room crew")
          # A member on b sends; ops on a reads it.
          message_id = b.succeed(mesh("reader", "room send", f"{room} --topic chat 'from reader'")).strip()
          (message,) = recv(a, "ops", "chat")
          assert message["id"] == message_id and message["agent"] == "reader" and message["room"] == room, message
          # The owner takes reader out; once b knows, reader's next send is refused.
          a.succeed(f"keel mesh room remove {room} reader@{b_id}")
          b.wait_until_succeeds(
              f"keel mesh room members {room} --json | jq -e 'all(.members[]; .id != \"reader@{b_id}\")'",
              timeout=60,
          )
          refused(b, "reader", "room send", f"{room} --topic chat 'still in?'", "is not a member of room crew")
          recorded_refusal(b, "reader", "room_send", "agent reader is not a member of room crew")

      with subtest("the policy holds after the daemons restart"):
          for machine in hosts.values():
              machine.succeed("systemctl restart keel-mesh.service")
          up()
          connected(a, "b")
          connected(b, "a")
          whoami_checks()
          refused(a, "sandbox", "send", f"{b_id} --topic reports.daily 'hello'", "has no mesh")
          refused(a, "worker", "send", f"reader@{b_id} --topic reports.daily 'x'", "may not send to")
          refused(b, "reader", "room send", f"{room} --topic chat 'still in?'", "is not a member of room crew")
          message_id = a.succeed(mesh("ops", "send", f"{b_id} --topic reports.weekly 'from ops, again'")).strip()
          arrived(b, message_id)
          reads_nothing(b, "reporter", "reports.weekly")
          (message,) = recv(b, "reader", "reports.weekly")
          assert message["id"] == message_id, message
          message_id = a.succeed(mesh("worker", "send", f"reporter@{b_id} --topic reports.weekly 'from worker'")).strip()
          (message,) = recv(b, "reporter", "reports.weekly")
          assert message["id"] == message_id and message["agent"] == "worker", message

      with subtest("the ledgers verify and hold no payload"):
          for machine in hosts.values():
              machine.succeed("keel ledger verify")
              entries = machine.succeed("keel ledger tail -n 1000 --json")
              assert "for reader only" not in entries and "standup" not in entries, "a payload reached the ledger"
    '';
}
