"""Embedded demos that `python -m tdm_train` runs with nothing downloaded."""
