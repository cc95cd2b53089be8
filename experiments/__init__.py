"""Experiments: LightningCLI entry points, YAML presets and reports."""
