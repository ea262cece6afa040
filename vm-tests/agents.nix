# keel agents at their trust tiers, under real systemd in a NixOS VM. Three
# agents (examples/agents/agent.py, which reports what its sandbox lets it
# do): scout at tier 2, notes at tier 1, ops at tier 0 as root.
{ pkgs, lib, ... }:
let
  agentCommand =
    name: port: extra:
    [
      (lib.getExe pkgs.python3)
      "${../examples/agents/agent.py}"
      "--name"
      name
      "--port"
      (toString port)
    ]
    ++ extra;

  # What every agent tries at start; its report.json says what worked.
  probes = [
    "--write"
    "/srv/keel-open"
    "--read"
    "/home/alice/secret.txt"
    "--read"
    "/var/lib/keel-agents/notes/report.json"
  ];
in
{
  name = "keel-agents";

  nodes.machine = {
    # Tier 2 needs keel egress; there is no resolver in the test network.
    services.keel.egress = {
      enable = true;
      upstream = [ "192.0.2.53" ];
    };
    services.keel.agents = {
      scout = {
        tier = 2;
        command = agentCommand "scout" 8702 ([ "--write" "/srv/keel-scout" ] ++ probes);
        readWritePaths = [ "/srv/keel-scout" ];
        environment.AGENT_ROLE = "web scout";
        egress.allow = [ "example.org" ];
        resources.tasksMax = 64;
      };
      notes = {
        tier = 1;
        command = agentCommand "notes" 8701 ([ "--write" "/srv/keel-notes" ] ++ probes);
        readWritePaths = [ "/srv/keel-notes" ];
      };
      ops = {
        tier = 0;
        user = "root";
        command = agentCommand "ops" 8700 probes;
      };
    };

    # Someone else's file, readable by every user but for the sandbox.
    users.users.alice = {
      isNormalUser = true;
      homeMode = "755";
    };
    environment.systemPackages = [
      pkgs.curl
      pkgs.jq
    ];
    systemd.tmpfiles.rules = [
      "d /srv/keel-scout 0750 keel-agent-scout keel-agent-scout - -"
      "d /srv/keel-notes 0750 keel-agent-notes keel-agent-notes - -"
      "d /srv/keel-open 1777 root root - -"
      "f /home/alice/secret.txt 0644 alice users - alice's secret"
    ];
  };

  testScript = ''
    import json


    def report(name: str) -> dict:
        return json.loads(machine.succeed(f"cat /var/lib/keel-agents/{name}/report.json"))


    def main_pid(name: str) -> str:
        return machine.succeed(f"systemctl show -P MainPID keel-agent-{name}.service").strip()


    def wait_for_report(name: str) -> dict:
        machine.wait_for_unit(f"keel-agent-{name}.service")
        machine.wait_until_succeeds(
            f"test \"$(jq -r .pid /var/lib/keel-agents/{name}/report.json 2>/dev/null)\""
            f" = \"$(systemctl show -P MainPID keel-agent-{name}.service)\""
        )
        return report(name)


    start_all()
    wait_for_report("notes")
    # Their reports tried to read notes' report: make them again, now that it exists.
    machine.succeed("systemctl restart keel-agent-scout.service keel-agent-ops.service")
    scout = wait_for_report("scout")
    notes = wait_for_report("notes")
    ops = wait_for_report("ops")

    with subtest("each agent runs as the user of its tier"):
        assert scout["user"] == "keel-agent-scout", scout["user"]
        assert notes["user"] == "keel-agent-notes", notes["user"]
        assert ops["user"] == "root", ops["user"]
        assert scout["environment"] == {"AGENT_ROLE": "web scout"}

    with subtest("keel reads the specs the module wrote"):
        listed = json.loads(machine.succeed("keel agents list --json"))["agents"]
        assert {name: a["tier"] for name, a in listed.items()} == {"scout": 2, "notes": 1, "ops": 0}
        assert all(a["state"] == "active" for a in listed.values()), listed

    with subtest("tier 2 writes its declared paths and nothing else"):
        assert scout["checks"]["write:/srv/keel-scout"] == "ok", scout["checks"]
        assert scout["checks"]["write:/srv/keel-open"] == "EROFS", scout["checks"]

    with subtest("tier 2 reads neither /home nor another agent's state"):
        assert scout["checks"]["read:/home/alice/secret.txt"] != "ok", scout["checks"]
        assert scout["checks"]["read:/var/lib/keel-agents/notes/report.json"] != "ok", scout["checks"]

    with subtest("tier 2 opens IP sockets but no raw, packet or netlink ones"):
        assert scout["checks"]["socket:inet"] == "ok"
        for kind in ("raw", "packet", "netlink"):
            assert scout["checks"][f"socket:{kind}"] != "ok", (kind, scout["checks"])

    with subtest("tier 2 has no capabilities, no new privileges and a system-call filter"):
        assert scout["status"]["NoNewPrivs"] == "1", scout["status"]
        assert scout["status"]["Seccomp"] == "2", scout["status"]
        assert int(scout["status"]["CapEff"], 16) == 0, scout["status"]

    with subtest("tier 1 sees a read-only system and no /home"):
        assert notes["checks"]["write:/srv/keel-notes"] == "ok", notes["checks"]
        assert notes["checks"]["write:/srv/keel-open"] == "EROFS", notes["checks"]
        assert notes["checks"]["read:/home/alice/secret.txt"] != "ok", notes["checks"]

    with subtest("tier 0 runs with systemd's defaults"):
        assert ops["checks"]["write:/srv/keel-open"] == "ok", ops["checks"]
        assert ops["checks"]["read:/home/alice/secret.txt"] == "ok", ops["checks"]
        assert ops["checks"]["socket:raw"] == "ok", ops["checks"]

    with subtest("a killed agent comes back through Restart=always"):
        before = main_pid("scout")
        machine.succeed(f"kill -KILL {before}")
        machine.wait_until_succeeds(
            f"pid=$(systemctl show -P MainPID keel-agent-scout.service); "
            f"test \"$pid\" != 0 && test \"$pid\" != {before}"
        )
        machine.wait_for_unit("keel-agent-scout.service")
        restarts = int(machine.succeed("systemctl show -P NRestarts keel-agent-scout.service"))
        assert restarts >= 1, restarts
        machine.wait_for_open_port(8702)
        machine.succeed("curl --fail --silent http://127.0.0.1:8702/health")
  '';
}
