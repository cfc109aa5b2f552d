"""voxdiff: anatomy-guided diffusion pretraining for 3D CT and organ segmentation from frozen features."""

__version__ = "0.1.0"
