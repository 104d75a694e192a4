"""The edge model: frozen backbones, LoRA adapters (peft), task heads, private parts."""
