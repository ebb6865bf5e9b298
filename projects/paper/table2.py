#!/usr/bin/env python
"""Paper Table 2 (sensitivity with IoBB): the IoBB view of Table 1's runs.

    python projects/paper/table2.py --root datasets --num-gpus 4
    python projects/paper/table2.py --quick

Same arguments, runs and outputs as table1.py (which writes both table1.md and table2.md); the
runs are shared, so after table1.py this only re-reads them and rewrites the tables.
"""

from table1 import main

if __name__ == "__main__":
    from elixir_d2.cli import run_cli

    run_cli(main)
