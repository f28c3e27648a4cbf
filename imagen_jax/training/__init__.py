"""Training: the train state and step, and the one function that builds and lowers it."""
