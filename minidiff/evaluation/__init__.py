"""Judging a trained model, beside the core path: the variational bound in bits per dimension (likelihood), the
judge's classifier (classifier), its measures (metrics), known degradations to calibrate it (degrade), and the
evaluation that puts them together (evaluate)."""
