"""Training: the engine that fits and predicts (``engine.py``, with the run-wide ``stop`` signal and
terminal ``progress``), the baseline and the shrunk candidates (``train.py``), a brought model
(``given.py``: weights, a user's factory code, or a registered version), the ratio search
(``search.py``), the sensitivity tables and the budget allocation (``sensitivity.py``,
``allocate.py``) and TensorBoard logging. It may use data (the prepared splits), the decision's
shared rules (``gate``, ``stats``), the store (only ``given.py``, to read a registered baseline),
``models/`` and the shared vocabulary; never measurement, promotion or the stages.
"""
