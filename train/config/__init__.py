"""Configuration: the typed schema every run is validated against (`schema`: engine-blind rules),
Hydra composition of the recipes in `recipes/` with the groups in `configs/` (`compose`, which adds
the chosen engine's own rules from `train.engines`), and the `--config-name` argument parsing the
entry points share (`args`)."""
