"""`fang inspect`: views of the artifacts (never the model weights), one module per view; `cli` wires them
into the command line."""
