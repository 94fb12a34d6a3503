"""Launchers: render the command lines that start training (torchrun now; slurm later)."""
