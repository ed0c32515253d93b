"""How the model runs on this machine: precision policy, CPU threads, allocator settings."""
