#!/usr/bin/env python
"""Differentiable search of the Auto-lesion Blocks (ALB / ALB_r), or a random genotype.

    python search_net.py --config-file configs/search_alb_R_50_FPN_deeplesion.yaml --num-gpus 4
    python search_net.py --config-file configs/quickstart/search_alb.yaml \
        MODEL.WEIGHTS output/quickstart/fpn/model_final.pth        # CPU, synthetic data
    python search_net.py --config-file C --resume                  # continue an interrupted search
    python search_net.py --config-file C --random SEED 3           # Table 6's "random ALB"

Writes OUTPUT_DIR/genotype.yaml (use it as MODEL.ALB.GENOTYPE of train_net.py), alphas.json
(softmax(alpha) after every epoch) and alphas.png; --random writes genotype.yaml only.
Multi-machine: add --num-machines M --machine-rank R --dist-url tcp://<host0>:<port>.
"""

from elixir_d2.cli import run_cli
from elixir_d2.commands.search import (  # noqa: F401  (the script's API)
    build_parser,
    check_inputs,
    cli,
    command_line,
    main,
    provenance,
    setup,
    write_random_genotype,
)

if __name__ == "__main__":
    run_cli(cli)
