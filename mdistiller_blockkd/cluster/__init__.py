"""Running the toolbox's commands on clusters: :mod:`.slurm` runs a study's runs as Slurm jobs."""
