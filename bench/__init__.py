"""Benchmarks of resumable against PyTorch DCP, safetensors, torch.save and the disk.

Entry point: ``python -m bench.run`` (``make bench``); see bench/run.py.
"""
