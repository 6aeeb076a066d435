"""Process groups and parallelism applied to a built model from outside."""
