"""Distributed setup: process groups, data-parallel wrapping (DDP / FSDP2) and the reductions the
loop needs (`distributed`)."""
