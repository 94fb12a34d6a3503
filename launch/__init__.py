"""Launchers: render the command lines that start training (single-node torchrun, slurm sbatch)."""
