"""Process groups and the tensor-parallel mappings and layers; nothing here knows a model."""
