# keel switch in a NixOS VM that boots through systemd-boot (with boot
# counting): a good specialisation commits and its first boot is blessed by
# keel's gate, a bad one (its agent crashes) rolls back, a switcher killed
# mid-gate is rolled back by the transient timer, and a crash during the gate
# boots the old generation.
{ pkgs, lib, ... }:
let
  agent = [
    (lib.getExe pkgs.python3)
    "${../examples/agents/agent.py}"
    "--name"
    "web"
    "--port"
    "8080"
  ];
in
{
  name = "keel-safeswitch";

  nodes.machine = {
    virtualisation.useBootLoader = true;
    virtualisation.useEFIBoot = true;
    boot.loader.systemd-boot.enable = true;
    boot.loader.systemd-boot.bootCounting.enable = true;
    boot.loader.efi.canTouchEfiVariables = true;
    # A machine-id that persists across reboots (as nixpkgs' systemd-boot tests do).
    environment.etc."machine-id".text = "1234567890abcdef1234567890abcdef\n";

    services.keel.agents.web = {
      tier = 1;
      command = agent;
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
    services.keel.safeswitch = {
      enable = true;
      gate = 10;
      deadline = 120;
      checks.http = [
        {
          url = "http://127.0.0.1:8080/health";
          name = "web answers";
        }
      ];
    };
    environment.systemPackages = [ pkgs.jq ];

    specialisation.good.configuration = {
      environment.etc."keel-release".text = "good\n";
    };
    # The agent of this one exits at once: watch restarts it, it exits again.
    specialisation.bad.configuration = {
      environment.etc."keel-release".text = "bad\n";
      services.keel.agents.web.command = lib.mkForce [ (lib.getExe' pkgs.coreutils "false") ];
    };
  };

  testScript = ''
      import json


      def running() -> str:
          return machine.succeed("readlink -f /run/current-system").strip()


      def profile_link() -> str:
          return machine.succeed("readlink /nix/var/nix/profiles/system").strip()


      def switch(target: str, extra: str = "") -> tuple[int, dict]:
          status, out = machine.execute(f"keel switch --json {extra} {target}", timeout=600)
          return status, json.loads(out)


      def web_healthy() -> None:
          machine.wait_until_succeeds(
              "keel status --json | jq -e '.agents.web.state == \"healthy\"'", timeout=120
          )


      def start_switcher(target: str, extra: str) -> None:
          machine.succeed(
              f"systemd-run --unit=switcher --service-type=exec keel switch {extra} {target}"
          )
          machine.wait_until_succeeds(
              "jq -e '.phase == \"gating\"' /run/keel/safeswitch/state.json", timeout=300
          )


      start_all()
      machine.wait_for_unit("multi-user.target")
      machine.wait_for_unit("keel-watch.service")
      web_healthy()
      # The system the VM booted: generation 1, with its two specialisations.
      base = running()
      good = machine.succeed(f"readlink -f {base}/specialisation/good").strip()
      bad = machine.succeed(f"readlink -f {base}/specialisation/bad").strip()
      assert profile_link() == "system-1-link"
      assert machine.succeed("readlink -f /nix/var/nix/profiles/system").strip() == base

      with subtest("a good specialisation commits: new generation, new boot default"):
          status, report = switch(good)
          assert status == 0, report
          assert report["outcome"] == "committed", report
          assert running() == good
          assert profile_link() == "system-2-link"
          assert machine.succeed("cat /etc/keel-release").strip() == "good"
          machine.succeed("grep -l 'version Generation 2' /boot/loader/entries/nixos-*.conf")
          machine.fail("systemctl list-units --all --plain --no-legend 'keel-safeswitch-rollback-*' | grep .")
          history = json.loads(machine.succeed("keel switch history --json"))
          assert [h["outcome"] for h in history] == ["committed"], history

      with subtest("the committed generation's first boot is blessed by keel's gate"):
          machine.shutdown()
          machine.start()
          machine.wait_for_unit("multi-user.target")
          assert running() == good
          machine.wait_for_unit("keel-safeswitch-boot-check.service")
          machine.wait_for_unit("systemd-bless-boot.service")
          entry = machine.succeed(
              "grep -l 'version Generation 2' /boot/loader/entries/nixos-*.conf"
          ).strip()
          assert "+" not in entry.rsplit("/", 1)[-1], entry
          web_healthy()

      with subtest("a bad specialisation (its agent crashes) rolls back"):
          status, report = switch(bad)
          assert status == 1, report
          assert report["outcome"] == "rolled-back", report
          assert "web" in report["reason"], report
          assert running() == good
          assert profile_link() == "system-2-link"
          assert machine.succeed("cat /etc/keel-release").strip() == "good"
          web_healthy()

      with subtest("a switcher killed mid-gate is rolled back by the transient timer"):
          start_switcher(base, "--gate 50 --deadline 60")
          assert running() == base
          machine.succeed("systemctl kill --signal=SIGKILL switcher.service")
          machine.wait_until_succeeds(
              "jq -e '.phase == \"rolled-back\" and .rolled_back_by == \"timer\"' "
              "/run/keel/safeswitch/state.json",
              timeout=300,
          )
          assert running() == good
          assert profile_link() == "system-2-link"
          machine.succeed("systemctl reset-failed switcher.service")

      with subtest("a crash during the gate boots the old generation"):
          start_switcher(base, "--gate 500 --deadline 600")
          assert running() == base
          machine.crash()
          machine.start()
          machine.wait_for_unit("multi-user.target")
          assert running() == good, running()
          assert profile_link() == "system-2-link"
          history = json.loads(machine.succeed("keel switch history --json"))
          assert history[-1]["outcome"] == "interrupted", history
          machine.succeed("keel switch status | grep -q 'no switch since boot'")
    '';
}
