# Three keel hosts in NixOS VMs as one fleet: the status of every node seen
# from any one, a node that goes down shown unreachable with its last report,
# an operator's command carried out and a non-operator's refused, a rollout of
# a bad configuration that stops at the canary (back on its old generation),
# and the fleet audit after the nodes have witnessed each other's ledgers.
{ pkgs, lib, ... }:
let
  # a's mesh identity, fixed so that b and c can declare a their operator at
  # build time (a test key: its private half is in the Nix store).
  # python/tests/nix/test_vm_tests.py checks that the id is this key's.
  operatorId = "tpmh5ttrtzw73hlbbzk7bzvcuibqzwj6";
  operatorKey = pkgs.writeText "fleet-test-a-identity.key" ''
    {
     "version": 1,
     "node_id": "tpmh5ttrtzw73hlbbzk7bzvcuibqzwj6",
     "static_private": "c1b6d93992833428a64026106f3ab85bd2e53499ee78eb697183ae2709d5417d",
     "signing_private": "89021d17cadf4da05301c31da0ebc93915f8821aab512fa010ea4bb11c1e66e5"
    }
  '';

  node =
    { config, ... }:
    {
      services.keel.agents.web = {
        tier = 1;
        command = [
          (lib.getExe pkgs.python3)
          "${../examples/agents/agent.py}"
          "--name"
          "web"
          "--port"
          "8080"
        ];
        health.probes = [
          {
            type = "http";
            url = "http://127.0.0.1:8080/health";
            interval = 1;
            timeout = 1;
            failures = 2;
          }
        ];
      };
      services.keel.watch.enable = true;
      imports = [ ./lib/mesh-node.nix ];
      services.keel.mesh.settings = {
        keepalive_interval = 1;
        idle_timeout = 4;
      };
      services.keel.fleet = {
        enable = true;
        operators = lib.mkIf (config.networking.hostName != "a") [ operatorId ];
        settings.witness_every = 2;
      };
      # Switches behind a gate on watch (the default check with watch on).
      services.keel.safeswitch = {
        enable = true;
        gate = 10;
        deadline = 120;
      };
      # A configuration whose agent exits at once: watch restarts it, it exits again.
      specialisation.bad.configuration = {
        environment.etc."keel-release".text = "bad\n";
        services.keel.agents.web.command = lib.mkForce [ (lib.getExe' pkgs.coreutils "false") ];
      };
      environment.etc."keel-release".text = lib.mkDefault "good\n";
      environment.systemPackages = [ pkgs.jq ];
    };
in
{
  name = "keel-fleet";

  nodes = {
    a = {
      imports = [
        node
        (import ./lib/fixed-identity.nix operatorKey)
      ];
    };
    b = node;
    c = node;
  };

  testScript =
    { nodes, ... }:
    ''
      import json

      hosts = {"a": a, "b": b, "c": c}
      addresses = {
          "a": "${nodes.a.networking.primaryIPAddress}",
          "b": "${nodes.b.networking.primaryIPAddress}",
          "c": "${nodes.c.networking.primaryIPAddress}",
      }

      start_all()
      for name, machine in hosts.items():
          machine.wait_for_unit("keel-mesh.service")
          machine.wait_for_open_port(7400, addresses[name])
          machine.wait_for_unit("keel-fleet.service")
          machine.wait_for_unit("keel-agent-web.service")

      ids = {name: m.succeed("keel mesh id").strip() for name, m in hosts.items()}
      assert ids["a"] == "${operatorId}", ids


      def fleet_status(machine) -> dict:
          # exit 1 when a node is not healthy: the JSON is what is judged here
          return json.loads(machine.succeed("keel fleet status --json || true"))


      def rows(machine) -> dict:
          return {row["report"]["host"] if row["report"] else row["node"]: row
                  for row in fleet_status(machine)["nodes"]}


      with subtest("the nodes form one mesh"):
          for joiner in ("b", "c"):
              token = a.succeed("keel mesh invite --ttl 300").strip()
              hosts[joiner].succeed(f"keel mesh join {token}")
          for name, machine in hosts.items():
              for other, node_id in ids.items():
                  if other != name:
                      machine.wait_until_succeeds(
                          f"keel mesh peers --json | jq -e '.[] | select(.id == \"{node_id}\") | .connected'",
                          timeout=60,
                      )

      with subtest("status from one node shows every node, each answering for itself"):
          b.wait_until_succeeds("keel fleet status --json", timeout=90)
          seen = rows(b)
          assert sorted(seen) == ["a", "b", "c"], seen
          for host, row in seen.items():
              assert row["state"] == "healthy", row
              assert row["report"]["agents"]["web"]["state"] == "healthy", row
              assert row["report"]["system"]["current"].startswith("/nix/store/"), row
              assert row["report"]["services"]["watch"]["state"] == "up", row
          b.succeed("keel fleet status | grep -q healthy")

      with subtest("a node that goes down is unreachable, with its last report"):
          c.succeed("systemctl stop keel-fleet.service keel-mesh.service")
          a.wait_until_succeeds(
              "keel fleet status --json | jq -e "
              f"'.nodes[] | select(.node == \"{ids['c']}\") | .state == \"unreachable\" and .stale'",
              timeout=30,
          )
          row = rows(a)["c"]
          assert row["report"]["host"] == "c" and row["last_seen"] is not None, row
          a.fail("keel fleet status")  # not every node healthy: exit 1
          c.succeed("systemctl start keel-mesh.service keel-fleet.service")
          a.wait_until_succeeds("keel fleet status", timeout=90)

      with subtest("the operator restarts an agent on another node; others may not"):
          before = b.succeed("systemctl show -P MainPID keel-agent-web.service").strip()
          a.succeed("keel fleet restart b web")
          b.wait_until_succeeds(
              f"[ \"$(systemctl show -P MainPID keel-agent-web.service)\" != {before} ] "
              "&& keel status --json | jq -e '.agents.web.state == \"healthy\"'",
              timeout=60,
          )
          out = c.fail("keel fleet stop b web 2>&1")
          assert "is not an operator of node" in out, out
          b.succeed("keel status --json | jq -e '.agents.web.state != \"stopped\"'")
          for machine, role in ((a, "asked"), (b, "acted")):
              entries = [json.loads(line) for line in machine.succeed(
                  "keel ledger tail -n 500 --json").splitlines()]
              kinds = [(e["kind"], e["data"].get("role")) for e in entries if e["source"] == "fleet"]
              assert ("command_result", role) in kinds, kinds

      with subtest("a rollout of a bad configuration stops at the canary, back on its old generation"):
          before = {n: hosts[n].succeed("readlink -f /run/current-system").strip() for n in ("b", "c")}
          status, out = a.execute(
              "keel fleet switch --json --specialisation bad --nodes b,c", timeout=900
          )
          report = json.loads(out)
          assert status == 1, report
          assert report["canary"] == ids["b"] and report["halted_by"] == ids["b"], report
          assert report["nodes"][ids["b"]]["switch"] == "rolled-back", report
          assert report["switched"] == [] and report["not_started"] == [ids["c"]], report
          for name in ("b", "c"):
              machine = hosts[name]
              assert machine.succeed("readlink -f /run/current-system").strip() == before[name]
              assert machine.succeed("readlink /nix/var/nix/profiles/system").strip() == "system-1-link"
              assert machine.succeed("cat /etc/keel-release").strip() == "good"
          history = json.loads(b.succeed("keel switch history --json"))
          assert [h["outcome"] for h in history] == ["rolled-back"], history
          assert json.loads(c.succeed("keel switch history --json")) == []
          b.wait_until_succeeds("keel status --json | jq -e '.agents.web.state == \"healthy\"'", timeout=120)
          shown = json.loads(a.succeed("keel fleet rollout --json"))
          assert shown["halted_by"] == ids["b"], shown

      with subtest("every node witnessed the others, and the audit finds them consistent"):
          for machine in hosts.values():
              machine.wait_until_succeeds(
                  "keel fleet witness --json | jq -e '.witnessed | length == 2'", timeout=60
              )
          result = json.loads(a.succeed("keel fleet audit --json"))
          assert result["problems"] == [], result
          assert sorted(n["verdict"] for n in result["nodes"]) == ["consistent"] * 3, result
          # a's checkpoint with b's and c's cosignatures: the ledger extends it
          a.succeed("keel fleet checkpoint > /tmp/cosigned.note")
          a.succeed("keel ledger verify --checkpoint /tmp/cosigned.note")
    '';
}
