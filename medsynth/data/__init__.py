"""Datasets: finding subjects on disk, checking them, and turning them into training batches."""
