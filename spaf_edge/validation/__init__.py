"""Validation of exports: graph parity against PyTorch (here) and end-to-end token equality."""
