"""The command-line programs: `m2po` and its sub-commands (train, demo, evaluate, plot, engines).

Nothing in the library imports from here (tests/test_import_layers.py checks it): each module parses its
arguments and calls the library.
"""
