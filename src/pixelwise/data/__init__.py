"""Datasets: synthetic scenes, the standard formats, checks and joint augmentation."""
