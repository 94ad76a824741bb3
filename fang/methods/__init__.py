"""Pruning methods: the planning (`plan`: allocation, structure search and keep counts, resolved once), the
sequential driver (`driver`), the method interface (`base`) and what it prunes (`units`), the registry
(`fang.core.registry`: one line per method) and one module per method. Nothing is imported here: validating
params.yaml reads only the registry, and only pruning imports the algorithms."""
