"""backproplab: where deep-learning progress comes from, measured on digits."""

__version__ = "0.1.0"
