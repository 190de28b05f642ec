"""Experiments: many runs at once. `make reproduce` (Tables 2 and 5, Figures 6 and 7) and the
benchmarks. Runs the tools in child processes and reads their outputs; may import every other stage.
"""
