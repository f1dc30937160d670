"""meshpilot.strategies: ZeRO/offload through DeepSpeed, tensor parallel, expert parallel, zeroth-order."""
