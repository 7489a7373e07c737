"""Model pieces: layer specs, the LLM, the vision encoder, the ASVR visual head."""
