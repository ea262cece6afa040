# A keel mesh node on a VM test's network: listening on the node's own
# address (port 7400, firewall open), with quick reconnects for tests that
# kill or restart daemons. Tests add their own settings beside these.
{ config, ... }:
{
  services.keel.mesh = {
    enable = true;
    listen = "${config.networking.primaryIPAddress}:7400";
    openFirewall = true;
    settings = {
      dial_base = 0.2;
      dial_cap = 2;
    };
  };
}
