"""Tools around the pipeline: the benchmark (`fang bench`) and artifact inspection (`fang inspect`)."""
