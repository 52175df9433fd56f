"""Stage logic, grouped by what each part owns (see docs/development.md for the tree and the rules).

The top level holds the shared vocabulary every group uses (``config``, ``errors``, ``records``,
``layout``, ``io``, ``escape`` and ``stage_specs``, the stages' declared code, params and outputs);
the groups, from the top down: ``pipeline`` (the stages and the run cache), ``promotion`` (the
registry's review), ``measurement``, ``training``, ``data``, and at the bottom the pure
``decision`` beside the MLflow ``store``. A group imports only the groups below it; the
import-linter contracts in pyproject.toml enforce it.
"""
