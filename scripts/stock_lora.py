"""Stock ``mlx_lm lora`` training with its metrics printed as JSON lines, for scripts/bench.py.

    python scripts/stock_lora.py [mlx_lm lora options...]

Parses the options with mlx-lm's own parser and defaults and trains with mlx-lm's own
``train_model``: exactly what ``mlx_lm lora --train`` runs, plus a reporting callback
(recent mlx-lm prints its step rate and peak memory only to a terminal). Deliberately does
not import mlx_dft, so the process gets whatever BLAS MLX finds (LD_PRELOAD or none).
"""

import json
import sys
import types

import numpy as np
import yaml
from mlx_lm import lora
from mlx_lm.tuner.datasets import load_dataset
from mlx_lm.tuner.trainer import TrainingCallback
from mlx_lm.utils import load


class Report(TrainingCallback):
    def on_train_loss_report(self, info):
        print("REPORT " + json.dumps(info), flush=True)


def main(argv):
    args = vars(lora.build_parser().parse_args(argv))
    if args.get("config"):
        with open(args["config"]) as f:
            for k, v in (yaml.load(f, lora.yaml_loader) or {}).items():
                if args.get(k) is None:
                    args[k] = v
    for k, v in lora.CONFIG_DEFAULTS.items():
        if args.get(k) is None:
            args[k] = v
    args = types.SimpleNamespace(**args)
    np.random.seed(args.seed)
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, Report())


if __name__ == "__main__":
    main(sys.argv[1:])
