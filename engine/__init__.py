"""engine: the control plane. Specs, keys, planner, scheduler, client SDK and CLI."""
