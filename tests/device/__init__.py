"""The GPU test machine's kit: `make device-kit` builds `.devcheck/` here (build_kit.py), and
`bash .devcheck/device_check.sh` runs every GPU check there with the image's own python."""
