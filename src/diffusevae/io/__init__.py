"""Files: atomic, checked storage; model folders and trainer state (checkpoint); images and
their writers; datasets and the one loader of user images; the JSON and YAML readers.

Below the networks and the mathematics: nothing here knows what a diffusion is.
"""
