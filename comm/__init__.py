"""meshpilot.comm: rank layout, process groups, collectives, bandwidth probes and the communication cost model."""
