"""Avatar backends: photo -> animatable Gaussian head, and expression -> image of it."""
