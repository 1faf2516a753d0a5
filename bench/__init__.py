"""Benchmarks comparing medssl against the MONAI / tutorial-recipe baseline in one run (``python -m bench NAME``)."""
