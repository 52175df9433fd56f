"""A user's own package, deliberately called ``models``: shrinkflow's own packages live under
``shrinkflow.`` and never shadow it."""
