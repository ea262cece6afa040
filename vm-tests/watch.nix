# keel watch supervising an agent under real systemd in a NixOS VM: a crash,
# a hang, watch itself killed, and its own watchdog.
{ pkgs, lib, ... }:
{
  name = "keel-watch";

  nodes.machine = {
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
    services.keel.watch = {
      enable = true;
      watchdogSec = 5;
    };
    environment.systemPackages = [ pkgs.jq ];
  };

  testScript = ''
    import json


    def status() -> dict:
        return json.loads(machine.succeed("keel status --json"))["agents"]["web"]


    def agent_pid() -> int:
        return int(machine.succeed("systemctl show -P MainPID keel-agent-web.service"))


    def healthy_with_new_pid(old: int) -> None:
        machine.wait_until_succeeds(
            f"keel status --json | jq -e '.agents.web | .state == \"healthy\" and .pid != {old}'",
            timeout=60,
        )


    start_all()
    machine.wait_for_unit("keel-watch.service")
    machine.wait_for_unit("keel-agent-web.service")
    machine.wait_until_succeeds(
        "keel status --json | jq -e '.agents.web.state == \"healthy\"'", timeout=60
    )

    with subtest("watch runs as a notify service with its own watchdog"):
        assert machine.succeed("systemctl show -P Type keel-watch.service").strip() == "notify"
        assert machine.succeed("systemctl show -P WatchdogUSec keel-watch.service").strip() == "5s"
        machine.succeed("test -S /run/keel/watch.sock")
        machine.succeed("keel watch check-config")

    with subtest("a crashed agent is back and healthy"):
        before = agent_pid()
        machine.succeed(f"kill -KILL {before}")
        healthy_with_new_pid(before)
        assert status()["restarts"] >= 1, status()

    with subtest("a hung agent is found by its probe and restarted"):
        before = agent_pid()
        machine.succeed(f"kill -STOP {before}")
        healthy_with_new_pid(before)

    with subtest("the restarts are in the ledger, which verifies"):
        entries = [
            json.loads(line)
            for line in machine.succeed("keel ledger tail -n 100 --json").splitlines()
        ]
        assert any(e["source"] == "watch" and e["subject"] == "web" for e in entries), entries
        machine.succeed("keel ledger verify")

    with subtest("agents keep running while watch is down, and watch picks them up again"):
        before = agent_pid()
        machine.succeed("systemctl kill --signal=KILL keel-watch.service")
        machine.wait_for_unit("keel-watch.service")
        machine.wait_until_succeeds(
            "keel status --json | jq -e '.agents.web.state == \"healthy\"'", timeout=60
        )
        assert agent_pid() == before, "watch's restart restarted the agent"
  '';
}
