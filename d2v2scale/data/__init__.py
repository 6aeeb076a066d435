"""Data pipelines. Loaders take the data-parallel rank and size as plain integers."""
