"""What the project knows about model architectures: one module per model.

A model module holds everything about one architecture that more than one part of the
project needs: its HuggingFace and MindFormers names and fused layouts
(:mod:`resumable.models.qwen3`). The format readers know no model: they keep a
checkpoint's own names, and a model's mapping applies on top of them.
"""
