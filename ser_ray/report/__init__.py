"""Plots, tables and the HTML/Markdown report."""
