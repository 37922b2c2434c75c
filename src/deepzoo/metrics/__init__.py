"""Measures shared by families: classification reports, FID, tune validity."""
