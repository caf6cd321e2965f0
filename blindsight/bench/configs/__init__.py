"""Language-model configurations of public VLMs (transformers config.json subsets)."""
