"""Layer 5, models: weights in and out. Imports `config`, `errors` (and transformers, peft, gguf); no forward pass
of training is here.

- `load`: the policy and its reference from a folder, a hub id, a GGUF file or the embedded default (converted
  once into the cache), LoRA / QLoRA, the reward model's base, saving (a plain transformers folder or the adapter);
- `export`: a run's model (LoRA merged) as one GGUF file for llama.cpp and Ollama.
"""
