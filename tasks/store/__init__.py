"""The store: the MLflow connection and run lifecycle (``tracking.py``: ``Tracker``), the model
registry's versions, aliases and downloads (``registry.py``), the pyfunc model every registered
version carries (``serving.py``) and the locks that keep one writer per project and per registry
(``lock.py``). It may use only the shared vocabulary and ``models/``; it holds no rule about which
model wins and no training.
"""
