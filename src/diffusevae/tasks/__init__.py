"""What the commands produce, as functions a Python user calls: each writes one folder
(sampling, reconstruction and refinement, control through z, fitting the prior, the tour).
"""
