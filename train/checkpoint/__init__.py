"""Checkpoints: atomic sharded save and load of model, optimizer, data position, RNG and precision
state (`store`), and finding a run's newest complete checkpoint."""
