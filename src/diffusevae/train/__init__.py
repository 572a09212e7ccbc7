"""Training: the loop both stages share, what it saves and resumes from, and the two stages
(the VAE, then the refiner on the frozen VAE).
"""
