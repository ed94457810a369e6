"""Running one configuration: the Python API, resolved configs, the runner, checkpoints and
plug-ins."""
