"""The pipeline's stages, one module each (plan, encode, propagate, train, predict, refine,
evaluate): its settings class (``SETTINGS``), its stage function (``STAGE``), its case loop and
its Ray worker. Imports methods, data and core.
"""
