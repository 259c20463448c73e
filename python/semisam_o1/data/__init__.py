"""Data in and out: images (every format read and written here), case ids and folder indexing,
label maps, MSD / nnU-Net datasets and splits, plain-folder input, the feature store, slicing.
Imports only :mod:`semisam_o1.core`.
"""
