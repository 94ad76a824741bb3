"""One module per DVC stage: each reads its own params block, loads artifacts, calls the library, saves.

Every module exposes `run(params_path, ...)`; the `fang` CLI and dvc.yaml call them.
"""
