"""Training objectives: timestep sampling, noising, targets and loss weights, as small pure functions
shared by every architecture."""
