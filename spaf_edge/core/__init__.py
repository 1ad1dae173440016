"""Torch-free modules that the training side, the exporter and the runtime all import: settings,
the export manifest and graph IO names, errors, sampling, statistics, atomic writes, the shared
weight file, prompt sets and the machine description."""
