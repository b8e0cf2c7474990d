"""A study's runs as train-command processes: :mod:`.local` runs them in worker processes here,
:mod:`.slurm` as Slurm jobs."""
