"""Results of runs: run folders read and grouped (:mod:`.runs`), labels from the registry (:mod:`.labels`),
seed statistics (:mod:`.stats`), the report's tables (:mod:`.tables`) and plots (:mod:`.plots`), the demo's stages
and results (:mod:`.demo`)."""
