# The systemd sandbox every keel daemon runs in (not a module: an attribute
# set that watch.nix and mesh.nix merge under their own settings). Each
# daemon adds what it alone needs (paths, capabilities, ProtectProc).
{
  NoNewPrivileges = true;
  ProtectSystem = "strict";
  ProtectHome = true;
  PrivateTmp = true;
  PrivateDevices = true;
  ProtectKernelTunables = true;
  ProtectKernelModules = true;
  ProtectKernelLogs = true;
  ProtectControlGroups = true;
  ProtectClock = true;
  ProtectHostname = true;
  RestrictNamespaces = true;
  RestrictRealtime = true;
  RestrictSUIDSGID = true;
  LockPersonality = true;
  SystemCallArchitectures = "native";
  SystemCallFilter = [
    "@system-service"
    "~@privileged"
  ];
  # A filtered call fails with EPERM instead of killing the daemon: SQLite,
  # run as root, fchown()s the ledger's new -wal/-shm files to the
  # database's owner (@chown is in @privileged) and carries on when refused.
  SystemCallErrorNumber = "EPERM";
  RestrictAddressFamilies = [
    "AF_UNIX"
    "AF_INET"
    "AF_INET6"
  ];
}
