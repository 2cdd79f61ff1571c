"""Training: the LightningCLI, run-folder callbacks, loggers and the progress bar."""
