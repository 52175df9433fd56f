"""The registry's review: what enters the model registry and how its aliases move
(``promote.py`` gathers the decision's inputs, registers the winner and carries the verdict out),
the human review of a registered version (``review.py``) and a version's provenance and
reproduction (``reproduce.py``). It may use measurement (the evaluation table), training (the
device and accuracy helpers, a brought model's lineage), data, the decision, the store and the
shared vocabulary; it never decides a rule itself (that is ``decision.decide``).
"""
