"""The published DiffuseVAE checkpoints: their networks (where they differ from ours) and the
safe importer that maps a PyTorch Lightning file to a run folder.
"""
