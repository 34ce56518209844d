"""One module per CLI sub-command.

Each module defines ``HELP``, ``add_arguments(parser)``, ``overrides(args) -> {dotted.key: value}`` and
``run(args, config) -> dict`` (the result, also written by ``--json``). ``imgfeat.cli`` lists them.
"""
