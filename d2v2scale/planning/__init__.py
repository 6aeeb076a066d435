"""Planning a cluster run without a GPU: memory, collectives, step time and the layout search."""
