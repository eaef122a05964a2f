"""`edgepeft demo`: one shipped base, two adapters trained on the spot, one int4 export.

    corpus.py     the words, pretraining text and the two demo tasks (stdlib, seeded)
    paths.py      where the shipped base model lives (base_model/, package data)
    pipeline.py   train -> evaluate -> export -> verify -> device runtime, as one function
    cli.py        the `edgepeft demo` command

The base is built by scripts/make_demo_base.py; importing this package stays light.
"""
