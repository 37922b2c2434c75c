"""One module per family: its params section, its models, and how it is evaluated and sampled."""
