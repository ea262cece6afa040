# The whole appliance on one host: the profile, an agent at tier 2 under
# watch, a mesh node, and the ledger they share.
{ pkgs, lib, ... }:
{
  name = "keel-appliance";

  nodes.machine =
    { config, ... }:
    {
      services.keel = {
        appliance.enable = true;
        # Tier 2 needs keel egress; there is no resolver in the test network.
        egress = {
          enable = true;
          upstream = [ "192.0.2.53" ];
        };
        agents.scout = {
          tier = 2;
          command = [
            (lib.getExe pkgs.python3)
            "${../examples/agents/agent.py}"
            "--name"
            "scout"
            "--port"
            "8702"
          ];
          health.probes = [
            {
              type = "http";
              url = "http://127.0.0.1:8702/health";
              interval = 1;
              failures = 2;
            }
          ];
        };
        watch.enable = true;
        mesh = {
          enable = true;
          listen = "${config.networking.primaryIPAddress}:7400";
        };
      };
      # The first-boot seed, from a directory the test fills (on a real
      # image it is the EFI system partition's keel-seed/).
      services.keel.appliance.seed.directory = "/var/keel-seed";
      # A host that says otherwise wins over the profile.
      time.timeZone = "Europe/Berlin";
      environment.systemPackages = [ pkgs.jq ];
    };

  testScript = ''
    import json

    start_all()
    machine.wait_for_unit("multi-user.target")
    for unit in ("keel-watch", "keel-mesh", "keel-agent-scout"):
        machine.wait_for_unit(f"{unit}.service")

    with subtest("the profile's defaults are in effect, the host's own choices win"):
        manager = machine.succeed("systemd-analyze cat-config systemd/system.conf")
        assert "RuntimeWatchdogSec=15s" in manager, manager
        assert "RebootWatchdogSec=30s" in manager, manager
        assert machine.succeed("sysctl -n kernel.panic").strip() == "10"
        machine.wait_for_unit("sshd.service")
        sshd = machine.succeed("sshd -T")
        assert "passwordauthentication no" in sshd, sshd
        assert "kbdinteractiveauthentication no" in sshd, sshd
        assert machine.succeed("readlink /etc/localtime").strip().endswith("Europe/Berlin")

    with subtest("keel's files and directories belong to the keel group"):
        for path in ("/var/lib/keel", "/run/keel"):
            assert machine.succeed(f"stat -c %a:%G {path}").strip() == "2770:keel", path
        machine.succeed("test -f /etc/keel/agents/scout.json")
        machine.succeed("keel watch check-config")

    with subtest("watch supervises the agent declared in services.keel.agents"):
        machine.wait_until_succeeds(
            "keel status --json | jq -e '.agents.scout.state == \"healthy\"'", timeout=60
        )
        pid = machine.succeed("systemctl show -P MainPID keel-agent-scout.service").strip()
        machine.succeed(f"kill -KILL {pid}")
        machine.wait_until_succeeds(
            f"keel status --json | jq -e '.agents.scout | .state == \"healthy\" and .pid != {pid}'",
            timeout=60,
        )

    with subtest("the seed's SSH key becomes root's, once"):
        machine.succeed(
            "mkdir -p /var/keel-seed && ssh-keygen -q -t ed25519 -N \"\" -C operator -f /tmp/operator"
        )
        machine.succeed("cp /tmp/operator.pub /var/keel-seed/authorized_keys")
        machine.succeed("systemctl restart keel-seed-keys.service")
        machine.succeed("grep -qF \"$(cut -d' ' -f2 /tmp/operator.pub)\" /root/.ssh/authorized_keys")
        assert machine.succeed("stat -c %a /root/.ssh/authorized_keys").strip() == "600"
        machine.succeed("test -f /var/keel-seed/authorized_keys.applied")
        machine.fail("test -e /var/keel-seed/authorized_keys")
        # And the key logs in over SSH, as the operator will.
        machine.succeed(
            "ssh -i /tmp/operator -o StrictHostKeyChecking=no -o BatchMode=yes "
            "root@127.0.0.1 keel status --json"
        )

    with subtest("every daemon writes the one ledger, which verifies"):
        machine.succeed("keel mesh invite")
        entries = [
            json.loads(line)
            for line in machine.succeed("keel ledger tail -n 200 --json").splitlines()
        ]
        sources = {entry["source"] for entry in entries}
        assert {"watch", "mesh"} <= sources, sources
        machine.succeed("keel ledger verify")
  '';
}
