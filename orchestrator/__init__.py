"""meshpilot.orchestrator: job configuration, the plan, the simulator, the planner and the CLI."""
