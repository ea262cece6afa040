# A VM test's node with a fixed mesh identity, so that other nodes can name it
# at build time (fleet operators, remote MCP tools). `key` is a key file as
# `keel mesh init` writes it (a test key: its private half is in the Nix
# store); python/tests/nix/test_vm_tests.py checks that the id the test
# declares is that key's. The key is put in place before the mesh node first
# starts, and only if the node has none yet.
key: {
  systemd.services.keel-test-identity = {
    wantedBy = [ "keel-mesh.service" ];
    before = [ "keel-mesh.service" ];
    serviceConfig.Type = "oneshot";
    script = ''
      if [ ! -e /var/lib/keel/mesh/identity.key ]; then
        install -D -m 0600 -o keel-mesh -g keel ${key} /var/lib/keel/mesh/identity.key
      fi
    '';
  };
}
