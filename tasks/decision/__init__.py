"""The decision, pure: the paired non-inferiority statistics (``stats.py``), the selection rules every
stage shares (``gate.py``), the promotion rule that chooses a kind and a winner from measured
figures (``decide.py``: ``decide()`` and its ``Verdict``) and the Markdown and plots that show it
(``report.py``). It may use only the shared vocabulary and numeric libraries: no MLflow, no torch
training, no data loading, no other group of ``tasks/``.
"""
