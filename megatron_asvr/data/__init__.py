"""Data: LLaVA records, validation, shards, image preprocessing, loaders and the demo corpus."""
