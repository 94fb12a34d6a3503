"""`python -m train.plan` (`__main__`): size a recipe before running it. `estimate`: parameter
counts and memory per GPU from the config alone (meta device, no data); `measure`: a few real
training steps of the assembled stage on this device (`--measure`)."""
