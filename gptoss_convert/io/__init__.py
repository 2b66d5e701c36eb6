"""File formats: safetensors (read/write, streaming), HF checkpoint directories, Orbax output."""
