# keel egress in NixOS VMs: a tier-2 agent reaches exactly its allowlist.
#
# `internet` stands for the world: an authoritative DNS server for the test
# zones and TCP services on several IPv4 and IPv6 addresses (the egress
# stand-in internet of the demo and the integration tests,
# examples/egress/internet.py, on dnspython). `machine` is a keel host
# with keel egress and two agents: scout (tier 2, an allowlist) and jail
# (tier 2, no allowlist: no egress at all); alice is a user keel does not
# manage. Agents' commands run as the agents' users (runuser), which is what
# nftables matches (`meta skuid`).
{ pkgs, lib, ... }:
let
  # The internet's addresses on the test VLAN (192.168.1.0/24 and
  # 2001:db8:1::/64, which the test framework gives every node's eth1).
  dnsAddress = "192.168.1.53";
  services4 = [
    "192.168.1.10"
    "192.168.1.11"
    "192.168.1.14"
  ];
  services6 = [
    "2001:db8:1::10"
    "2001:db8:1::11"
    "2001:db8:1::14"
  ];

  zones = pkgs.writeText "zones.txt" ''
    $ORIGIN allowed.test.
    @    300 IN SOA ns.allowed.test. admin.allowed.test. 1 60 60 600 300
    @    300 IN NS  ns.allowed.test.
    ns   300 IN A   ${dnsAddress}
    www  300 IN A   192.168.1.10
    www  300 IN AAAA 2001:db8:1::10
    dual 300 IN A   192.168.1.11
    dual 300 IN AAAA 2001:db8:1::11
    alias 300 IN CNAME edge.cdn.test.
    $ORIGIN cdn.test.
    @    300 IN SOA ns.cdn.test. admin.cdn.test. 1 60 60 600 300
    @    300 IN NS  ns.cdn.test.
    edge 300 IN A   192.168.1.11
    $ORIGIN other.test.
    @    300 IN SOA ns.other.test. admin.other.test. 1 60 60 600 300
    @    300 IN NS  ns.other.test.
    www  300 IN A   192.168.1.14
    www  300 IN AAAA 2001:db8:1::14
    into 300 IN CNAME www.allowed.test.
    $ORIGIN wild.test.
    @    300 IN SOA ns.wild.test. admin.wild.test. 1 60 60 600 300
    @    300 IN NS  ns.wild.test.
    @    300 IN A   192.168.1.14
    a    300 IN A   192.168.1.10
  '';

  internetPython = pkgs.python3.withPackages (ps: [ ps.dnspython ]);
  ip = lib.getExe pkgs.iproute2;

  # What an agent runs to reach HOST:PORT: prints the service's answer
  # ("ADDRESS PORT hello"), or fails.
  connect = pkgs.writeText "connect.py" ''
    import socket, sys

    host, port = sys.argv[1], int(sys.argv[2])
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"hello\n")
        print(s.recv(200).decode().strip())
  '';
in
{
  name = "keel-egress";

  nodes = {
    internet = {
      networking.firewall.enable = false;
      systemd.services.internet = {
        description = "the test internet: DNS and services";
        wantedBy = [ "multi-user.target" ];
        after = [ "network.target" ];
        serviceConfig = {
          ExecStartPre = map (address: "${ip} addr replace ${address}/24 dev eth1") (
            [ dnsAddress ] ++ services4
          )
          ++ map (address: "${ip} -6 addr replace ${address}/64 dev eth1 nodad") services6;
          ExecStart = "${lib.getExe internetPython} ${../examples/egress/internet.py} --zone ${zones} --dns ${dnsAddress}";
        };
      };
    };

    machine = {
      services.keel = {
        egress = {
          enable = true;
          upstream = [ dnsAddress ];
          min_ttl = 5;
          grace = 2;
        };
        agents = {
          scout = {
            tier = 2;
            command = [
              (lib.getExe' pkgs.coreutils "sleep")
              "infinity"
            ];
            egress.allow = [
              "www.allowed.test"
              "dual.allowed.test"
              "alias.allowed.test"
              "*.wild.test"
            ];
          };
          jail = {
            tier = 2;
            command = [
              (lib.getExe' pkgs.coreutils "sleep")
              "infinity"
            ];
          };
        };
      };
      users.users.alice.isNormalUser = true;
      environment.systemPackages = [
        pkgs.dig
        pkgs.python3
      ];
    };
  };

  testScript = ''
    import json

    DNS = "${dnsAddress}"


    def as_user(user: str, command: str) -> str:
        return f"runuser -u {user} -- {command}"


    def dig(user: str, name: str, rdtype: str = "A", server: str = DNS, tcp: bool = False) -> str:
        flags = "+tcp " if tcp else ""
        return machine.succeed(as_user(user, f"dig {flags}+time=3 +tries=1 @{server} {name} {rdtype}"))


    def reach(user: str, host: str, port: int = 80) -> str:
        return machine.succeed(as_user(user, f"python3 ${connect} {host} {port}")).strip()


    def blocked(user: str, host: str, port: int = 80) -> None:
        machine.fail(as_user(user, f"python3 ${connect} {host} {port}"))


    start_all()
    internet.wait_for_unit("internet.service")
    internet.wait_for_open_port(80)
    machine.wait_for_unit("keel-egress.service")
    machine.wait_for_unit("keel-agent-scout.service")
    machine.wait_for_unit("keel-agent-jail.service")

    with subtest("the rules are in keel's own table, and egress runs with CAP_NET_ADMIN only"):
        table = machine.succeed("nft list table inet keel")
        for chain in ("agent_scout", "agent_jail", "redirect", "output"):
            assert f"chain {chain}" in table, table
        caps = machine.succeed("systemctl show -P CapabilityBoundingSet keel-egress.service").strip()
        assert caps == "cap_net_admin", caps

    with subtest("an allowed name resolves and connects over IPv4 and IPv6"):
        assert "192.168.1.10" in dig("keel-agent-scout", "www.allowed.test")
        assert "2001:db8:1::10" in dig("keel-agent-scout", "www.allowed.test", "AAAA")
        assert reach("keel-agent-scout", "192.168.1.10") == "192.168.1.10 80 hello"
        assert reach("keel-agent-scout", "2001:db8:1::10") == "2001:db8:1::10 80 hello"

    with subtest("an unlisted name gets NXDOMAIN, whichever resolver the agent asks"):
        for server in (DNS, "9.9.9.9", "2001:db8:1::53"):
            for tcp in (False, True):
                assert "NXDOMAIN" in dig("keel-agent-scout", "www.other.test", server=server, tcp=tcp)
        # The agent's own libc resolver (no nscd for tier 2) goes to keel too.
        run_as_scout = "systemd-run --wait --pipe -p User=keel-agent-scout -p InaccessiblePaths=-/run/nscd"
        assert "192.168.1.10" in machine.succeed(f"{run_as_scout} getent ahostsv4 www.allowed.test")
        machine.fail(f"{run_as_scout} getent ahostsv4 www.other.test")

    with subtest("a direct connection to an unlisted address is blocked, on any port"):
        for host in ("192.168.1.14", "2001:db8:1::14"):
            for port in (80, 853):
                blocked("keel-agent-scout", host, port)

    with subtest("a CNAME chain counts from where it starts"):
        assert "192.168.1.11" in dig("keel-agent-scout", "alias.allowed.test")
        assert "NXDOMAIN" in dig("keel-agent-scout", "into.other.test")

    with subtest("wildcards match names below, not the name itself"):
        assert "192.168.1.10" in dig("keel-agent-scout", "a.wild.test")
        assert "NXDOMAIN" in dig("keel-agent-scout", "wild.test")

    with subtest("an agent without an allowlist reaches nothing"):
        assert "NXDOMAIN" in dig("keel-agent-jail", "www.allowed.test")
        blocked("keel-agent-jail", "192.168.1.10")

    with subtest("another user is unaffected"):
        assert "192.168.1.14" in dig("alice", "www.other.test")
        assert reach("alice", "192.168.1.14") == "192.168.1.14 80 hello"
        assert reach("alice", "2001:db8:1::14", 853) == "2001:db8:1::14 853 hello"

    with subtest("the agent cannot change the rules"):
        before = machine.succeed("nft list ruleset")
        machine.fail(as_user("keel-agent-scout", "nft flush table inet keel"))
        machine.fail(as_user("keel-agent-scout", "nft add element inet keel scout_v4 '{ 192.168.1.14 }'"))
        assert machine.succeed("nft list ruleset") == before

    with subtest("restarting egress keeps what the agent resolved and opens nothing new"):
        machine.succeed("systemctl restart keel-egress.service")
        machine.wait_for_unit("keel-egress.service")
        assert reach("keel-agent-scout", "192.168.1.10") == "192.168.1.10 80 hello"
        blocked("keel-agent-scout", "192.168.1.14")

    with subtest("with egress stopped the agent fails closed"):
        machine.succeed("systemctl stop keel-egress.service")
        machine.fail(as_user("keel-agent-scout", f"dig +time=2 +tries=1 @{DNS} dual.allowed.test"))
        assert reach("keel-agent-scout", "192.168.1.10") == "192.168.1.10 80 hello"
        blocked("keel-agent-scout", "192.168.1.14")
        machine.succeed("systemctl start keel-egress.service")
        machine.wait_for_unit("keel-egress.service")
        assert "192.168.1.11" in dig("keel-agent-scout", "dual.allowed.test")

    with subtest("status and the ledger tell what happened"):
        status = json.loads(machine.succeed("keel egress status --json"))
        scout = status["agents"]["scout"]
        assert scout["mode"] == "enforce" and scout["sets"]["v4"] >= 2, scout
        assert scout["blocked"]["packets"] > 0, scout
        entries = [json.loads(line) for line in machine.succeed("keel ledger tail -n 500 --json").splitlines()]
        kinds = {e["kind"] for e in entries}
        assert {"egress.rules", "egress.denied", "egress.blocked"} <= kinds, kinds
        machine.succeed("keel ledger verify")
  '';
}
