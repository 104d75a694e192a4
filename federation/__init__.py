"""fedge's core library: edge model, LoRA adapters, aggregation rules, datasets, privacy.

Pure Python + torch; nothing here imports Flower. `clients/` and `server/` wire it to
Flower's Message API.
"""
