"""Helpers shared by the tests: video files, configs, checkpoints. Import as `from helpers.X import ...`."""
