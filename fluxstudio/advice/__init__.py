"""Knowing the machine and the card a model will run on: the probe, the catalogue, the precision advice."""
