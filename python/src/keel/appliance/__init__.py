"""The keel appliance: what a keel image does on its own host (first boot)."""
