"""Analysis of merged maps: isotropic/anisotropic split, punch-and-fill, 3D-ΔPDF."""
