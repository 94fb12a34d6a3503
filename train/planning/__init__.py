"""Sizing a recipe before running it: parameter counts and memory per GPU (`estimate`), behind
`python -m train.plan`."""
