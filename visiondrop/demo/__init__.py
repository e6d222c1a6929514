"""The built-in demo: a synthetic shapes benchmark (`synthetic`) and the CPU recipe that trains the demo model on it
(`training`, `scripts/train_demo_model.py`)."""
