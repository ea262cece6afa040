"""egress: a per-agent, deny-by-default outbound firewall opened only for allowlisted names.

Pure cores (no I/O; clocks are parameters):

- ``allowlist``: entries (exact, ``*.`` wildcards, IDNA) and the match;
- ``answers``: read a query, shape the upstream's answer along its CNAME
  chain, list the addresses it allows; the answer cache;
- ``sets``: element timeouts (``max(TTL, min_ttl) + grace``) and the book of
  what each agent's sets hold, which decides insert / refresh / nothing;
- ``ruleset``: the config as one nftables JSON transaction on ``inet keel``;
- ``denials``: what the ledger hears of denied names and blocked packets,
  aggregated and rate-limited; what ``suggest`` proposes.

Shells: ``nft`` (``nft -j``), ``netlink`` (set elements over nfnetlink, the hot
path), ``nflog`` (blocked packets from the kernel), ``proxy`` (the per-agent
DNS listeners and the upstream client), ``daemon`` (all of it on
``keel.service``), and ``cli`` (``keel egress serve|check|status|suggest``).
"""
