"""Thin adapters between fedmerge and Flower's Message API (records, strategies, client helpers)."""
