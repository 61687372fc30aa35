"""Hugging Face interchange: mapping tables per architecture, safetensors I/O, import and export."""
