"""Real-model harness: decoder models (SmolLM2 / LLaMA family, Gemma 3), their loaders
(GGUF, Hugging Face safetensors), calibration capture, tokenizers, data and evaluation."""
