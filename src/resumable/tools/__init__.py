"""Offline checkpoint tools behind the ``resumable`` command line: inspect, verify, diff, merge, split, convert.

Each module holds one command's work as plain functions (no argparse, no printing
beyond progress bars), so tests and other programs call them directly; ``resumable.cli``
only parses arguments and formats results.
"""
