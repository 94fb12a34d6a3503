"""Configuration: the typed schema every run is validated against (`schema`), Hydra composition of
the recipes in `recipes/` with the groups in `configs/` (`compose`), and the `--config-name`
argument parsing the entry points share (`args`)."""
