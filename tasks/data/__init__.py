"""The data: where images come from (``sources.py``: built-in data sets, folders, arrays), the checks
they must pass (``datachecks.py``: enough images of each class, no image in two splits) and the prepared,
normalised splits every later stage reads (``prepare.py``). It may use the decision's shared rules
(``gate``), ``models/preprocess.py`` and the shared vocabulary; nothing about training, MLflow or
the registry.
"""
