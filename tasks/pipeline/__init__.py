"""The stages and their wiring: one plain function per pipeline stage (``stages.py``: prepare,
baseline, sensitivity, shrink, evaluate, promote), called alike by Prefect (``flows/``) and by DVC
(``shrinkflow stage``), and the run cache that skips a stage whose code, params and inputs are
unchanged (``cache.py``). This is the top of ``tasks/``: it may use every other group and the shared
vocabulary, and nothing in ``tasks/`` imports it (only ``flows/`` does).
"""
