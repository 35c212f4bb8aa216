"""equivision: measure, build, train and defend with equivariance in vision models."""

__version__ = "0.1.0"
