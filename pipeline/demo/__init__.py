"""Demo weights without the internet: synthetic data the project generates, and training."""
