# Two keel hosts in NixOS VMs sharing MCP tools over the mesh: an agent on a
# lists and calls a tool hosted on b, through both gateways; a tool b does
# not share with it is absent and refused, and so is every remote tool for an
# agent b shares nothing with; b's ledger names the caller as the mesh
# authenticated it; with b's node down, the call fails instead of hanging.
{ pkgs, lib, ... }:
let
  # b's mesh identity, fixed so that a can name b's node at build time (a test
  # key: its private half is in the Nix store). python/tests/nix/test_vm_tests.py
  # checks that the id is this key's.
  hostId = "czvbwutn4pvzuks5p3g4dajsdwwoqvdv";
  hostKey = pkgs.writeText "mcp-test-b-identity.key" ''
    {
     "version": 1,
     "node_id": "czvbwutn4pvzuks5p3g4dajsdwwoqvdv",
     "static_private": "fe880ef475f414e5460c5e74d3fba49efff3e758007a01462a680bac3650611e",
     "signing_private": "3f80916049b8d2cf26ff59aa0e286a88141713e779e8d0624b05a8f58f57b9bc"
    }
  '';

  # A stdio MCP server on the official SDK, as keel runs any server.
  notesServer = pkgs.writeText "notes-mcp.py" ''
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("notes")


    @server.tool()
    def lookup(key: str) -> str:
        """The note filed under `key`."""
        return {"motd": "hello from b"}.get(key, "")


    @server.tool()
    def secret() -> str:
        """Not for other nodes."""
        return "b's secret"


    server.run()
  '';

  # An agent's MCP client: one JSON line per operation, as python/tests/mcp_agent.py.
  agentClient = pkgs.writeText "mcp-agent.py" ''
    import json
    import sys
    from pathlib import Path

    import anyio
    from keel.mcp.client import unix_transport
    from mcp import Client, MCPError


    async def run(ops):
        async with Client(unix_transport(Path("/run/keel-mcp/mcp.sock"))) as client:
            for op in ops:
                try:
                    if op == "list":
                        listing = await client.list_tools()
                        out = {"tools": sorted(tool.name for tool in listing.tools)}
                    else:
                        name, arguments = op.split(":", 1)
                        result = await client.call_tool(name, json.loads(arguments))
                        out = {"result": result.model_dump(mode="json", exclude_none=True)}
                except MCPError as exc:
                    out = {"error": {"code": exc.code, "message": exc.message}}
                print(json.dumps(out), flush=True)


    anyio.run(run, sys.argv[1:])
  '';

  node = {
    imports = [ ./lib/mesh-node.nix ];
    services.keel.mcp.enable = true;
    environment.systemPackages = [ pkgs.jq ];
  };

  # keel's own Python (pkgs/python: the MCP SDK 2.x), with keel importable.
  python =
    config:
    (pkgs.callPackage ../pkgs/python { }).withPackages (ps: [
      (ps.toPythonModule config.services.keel.package)
    ]);
in
{
  name = "keel-mcp";

  nodes = {
    a =
      { config, ... }:
      {
        imports = [ node ];
        services.keel.agents = {
          # b shares its `lookup` with scout; `other` is granted nothing there.
          scout = {
            tier = 1;
            command = [
              (lib.getExe' pkgs.coreutils "sleep")
              "infinity"
            ];
          };
          other = {
            tier = 1;
            command = [
              (lib.getExe' pkgs.coreutils "sleep")
              "infinity"
            ];
          };
        };
        services.keel.mcp = {
          remote.b.node = hostId;
          mesh.deadline = 5;
        };
        environment.etc."keel-test/mcp-agent".source = pkgs.writeShellScript "mcp-agent" ''
          exec ${python config}/bin/python3 ${agentClient} "$@"
        '';
      };

    b =
      { config, ... }:
      {
        imports = [
          node
          (import ./lib/fixed-identity.nix hostKey)
        ];
        services.keel.mcp.servers.notes = {
          command = [
            "${python config}/bin/python3"
            "${notesServer}"
          ];
          tier = 1;
          share = [
            # scout, on any node of the mesh, may look notes up; nobody else there.
            {
              agents = [ "scout" ];
              tools = [ "lookup" ];
              nodes = "*";
            }
          ];
        };
      };
  };

  testScript =
    { nodes, ... }:
    ''
      import json
      import shlex

      hosts = {"a": a, "b": b}
      addresses = {
          "a": "${nodes.a.networking.primaryIPAddress}",
          "b": "${nodes.b.networking.primaryIPAddress}",
      }

      start_all()
      for name, machine in hosts.items():
          machine.wait_for_unit("keel-mesh.service")
          machine.wait_for_open_port(7400, addresses[name])
          machine.wait_for_unit("keel-mcp.service")
      a.wait_for_unit("keel-agent-scout.service")
      b.wait_for_unit("keel-mcp-notes.socket")

      ids = {name: m.succeed("keel mesh id").strip() for name, m in hosts.items()}
      assert ids["b"] == "${hostId}", ids


      def as_agent(agent: str, *ops: str) -> list:
          # The agent's own uid: the gateway names the caller from the kernel.
          command = " ".join(shlex.quote(op) for op in ops)
          lines = a.succeed(
              f"runuser -u keel-agent-{agent} -- /etc/keel-test/mcp-agent {command}",
              timeout=60,
          ).splitlines()
          return [json.loads(line) for line in lines]


      def listed(agent: str) -> list:
          (answer,) = as_agent(agent, "list")
          return answer["tools"]


      with subtest("a joins b's mesh"):
          token = b.succeed("keel mesh invite --ttl 300").strip()
          a.succeed(f"keel mesh join {token}")
          for machine, peer in ((a, "b"), (b, "a")):
              machine.wait_until_succeeds(
                  f"keel mesh peers --json | jq -e '.[] | select(.id == \"{ids[peer]}\") | .connected'",
                  timeout=60,
              )

      with subtest("scout on a sees and calls the tool b shares with it"):
          retry(lambda _: "b.notes.lookup" in listed("scout"), timeout_seconds=60)
          assert listed("scout") == ["b.notes.lookup"], listed("scout")
          (answer,) = as_agent("scout", 'b.notes.lookup:{"key": "motd"}')
          assert answer["result"]["content"][0]["text"] == "hello from b", answer

      with subtest("what b does not share is absent and refused"):
          (answer,) = as_agent("scout", "b.notes.secret:{}")
          assert "error" in answer, answer
          assert listed("other") == [], listed("other")
          (answer,) = as_agent("other", 'b.notes.lookup:{"key": "motd"}')
          assert "error" in answer, answer

      with subtest("b's ledger names the caller as the mesh authenticated it"):
          entries = [
              json.loads(line)
              for line in b.succeed("keel ledger tail -n 500 --json").splitlines()
          ]
          calls = [e for e in entries if e["kind"] == "mcp_call"]
          callers = {(e["data"]["caller"]["agent"], e["data"]["caller"]["node"], e["data"]["outcome"]) for e in calls}
          assert ("scout", ids["a"], "ok") in callers, callers
          assert ("scout", ids["a"], "refused") in callers, callers
          assert all(e["data"]["caller"]["agent"] != "root" for e in calls), calls
          b.succeed("keel ledger verify")

      with subtest("with b's node down, a call fails within the deadline instead of hanging"):
          # (as_agent gives up, failing the test, after 60 s: the deadline is 5 s)
          b.succeed("systemctl stop keel-mesh.service")
          (answer,) = as_agent("scout", 'b.notes.lookup:{"key": "motd"}')
          assert "error" in answer and "${hostId}" in answer["error"]["message"], answer
    '';
}
