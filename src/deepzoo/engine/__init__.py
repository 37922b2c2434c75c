"""The machinery every family shares: device choice, the trainer, experiment tracking, stages."""
