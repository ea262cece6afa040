# `nix run .#vm`: boots a NixOS VM (a `system.build.vm`, here the keel
# appliance's) with its SSH port forwarded to 127.0.0.1, the operator's public
# key and an optional mesh invite handed to the first-boot seed (shared into
# the guest as KEEL_SEED_DIR, see hosts/appliance.nix), and its disk kept
# between runs. docs/install.md.
#
#   KEEL_SSH_PORT     host port for the guest's SSH (default 2222)
#   KEEL_SSH_KEY      public key file (default: ~/.ssh/id_ed25519.pub,
#                     id_ecdsa.pub or id_rsa.pub, the first that exists)
#   KEEL_MESH_INVITE  a `keel mesh invite` token to join at first boot
#   KEEL_SEED_DIR     the seed directory (default: $XDG_STATE_HOME/keel-vm/seed)
#   NIX_DISK_IMAGE    the VM's disk (default: $XDG_STATE_HOME/keel-vm/keel.qcow2)
{
  lib,
  writeShellApplication,
  coreutils,
  vm,
}:
writeShellApplication {
  name = "keel-vm";
  runtimeInputs = [ coreutils ];
  text = ''
    state="''${XDG_STATE_HOME:-$HOME/.local/state}/keel-vm"
    seed="''${KEEL_SEED_DIR:-$state/seed}"
    port="''${KEEL_SSH_PORT:-2222}"
    case "$port" in
      "" | *[!0-9]*)
        echo "keel-vm: KEEL_SSH_PORT must be a port number, got '$port'" >&2
        exit 2
        ;;
    esac
    mkdir -p "$state" "$seed"

    key="''${KEEL_SSH_KEY:-}"
    if [ -z "$key" ]; then
      for candidate in "$HOME"/.ssh/id_ed25519.pub "$HOME"/.ssh/id_ecdsa.pub "$HOME"/.ssh/id_rsa.pub; do
        if [ -f "$candidate" ]; then
          key="$candidate"
          break
        fi
      done
    fi
    if [ -n "$key" ]; then
      if [ ! -f "$key" ]; then
        echo "keel-vm: KEEL_SSH_KEY=$key: no such file" >&2
        exit 2
      fi
      # Applied at boot, added to what the VM's disk already has.
      cp -- "$key" "$seed/authorized_keys"
    elif [ ! -e "$seed/authorized_keys.applied" ]; then
      echo "keel-vm: no public key (~/.ssh/id_*.pub): set KEEL_SSH_KEY=FILE to log in over SSH" >&2
    fi
    if [ -n "''${KEEL_MESH_INVITE:-}" ]; then
      printf '%s\n' "$KEEL_MESH_INVITE" > "$seed/mesh-invite"
    fi

    export KEEL_SEED_DIR="$seed"
    export NIX_DISK_IMAGE="''${NIX_DISK_IMAGE:-$state/keel.qcow2}"
    export QEMU_NET_OPTS="hostfwd=tcp:127.0.0.1:$port-:22''${QEMU_NET_OPTS:+,$QEMU_NET_OPTS}"
    echo "keel-vm: once it has booted: ssh -p $port root@127.0.0.1 keel status (Ctrl-a x quits)" >&2
    exec ${lib.getExe vm} "$@"
  '';
  meta.description = "Boot the keel appliance in QEMU with SSH on 127.0.0.1:2222";
}
