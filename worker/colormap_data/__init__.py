"""Colormap data generated once from matplotlib by scripts/generate_colormaps.py (never edited by hand).

A Python module rather than a data file, so it ships with the ``worker`` package without any
package-data configuration, and the worker reads it without matplotlib.
"""
