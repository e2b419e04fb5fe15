"""medsynth: translate one medical imaging contrast into another, geometry-exact."""

__version__ = "0.1.0"
