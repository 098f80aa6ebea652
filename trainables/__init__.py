"""Code that runs inside Ray Train workers and actors: models, losses, attacks, metrics, PIR-AT."""
