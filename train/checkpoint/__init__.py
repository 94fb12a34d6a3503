"""Checkpoints: the only reader and writer of the native checkpoint format. `files`: the COMPLETE
marker, `latest`, atomic writes and renames, finding a run's newest complete checkpoint, the run's
saved config.yaml; `store`: what the shards hold (training state or model-only weights), written
and read with torch.distributed.checkpoint; `layout`: how an engine's model and optimizer state
reach the native layout a checkpoint always holds."""
