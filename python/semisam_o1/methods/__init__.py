"""The method's array-level pieces, usable without a dataset or a work folder: the template vote
(round-0 pseudo-labels), kNN refinement primitives, class planes, connected components, metrics,
linear algebra, registration. Imports :mod:`semisam_o1.data` and :mod:`semisam_o1.core`.
"""
