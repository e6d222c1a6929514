"""Models built offline for tests, FLOPs proxies and the demo: tiny full-depth checkpoints of each family (`tiny`)."""
