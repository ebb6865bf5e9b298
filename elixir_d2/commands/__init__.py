"""The code of the entry scripts train_net.py and search_net.py, importable by projects/ and the
tests; the scripts themselves only parse the command line and report errors."""
