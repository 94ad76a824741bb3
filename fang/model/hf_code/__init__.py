"""Modeling code shipped inside every pruned checkpoint so stock transformers can load it.

The two modules here never import fang: `fang.model.portable` copies them verbatim (with the base
architecture's name substituted) next to the weights, where transformers' remote-code loader
imports them. They are written for Llama; see `fang.model.portable.write_portable_code`.
"""
