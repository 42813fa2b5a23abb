"""GGUF, the model format of llama.cpp, Ollama and LM Studio: reading models into mlx_dft and
writing fused models and adapters back (``names.py`` holds the naming conventions both use)."""
