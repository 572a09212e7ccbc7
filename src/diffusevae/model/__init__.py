"""A trained model: its run folder (every file name a run holds), which network class a model
folder holds, its prior on disk, and `DiffuseVAE`, the object that samples, refines,
reconstructs and inverts.
"""
