"""Model files: resolving a model (folder, Hugging Face repo, GGUF), GGUF import, dense copies."""
