"""Stage logic: one plain function per pipeline stage, shared by Prefect and DVC."""
