"""Interchange with transformers: Nemotron-H / Nemotron-H Omni configs and weights to and from the
native model (`conversion`)."""
