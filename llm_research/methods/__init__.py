"""Algorithms over models and param pytrees: pure `params -> params` surgeries."""
