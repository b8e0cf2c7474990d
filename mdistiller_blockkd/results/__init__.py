"""Results of runs: method and variant labels from the registry, seed statistics (and the report's run model)."""
