"""``diffusion-matting train MODEL ...``: training toolkits, one sub-command per ``py/train_*.py`` module.

Each ``diffusion_matting.py.train_<name>`` module exposes ``register_train(subparsers)`` adding its own
sub-command (e.g. ``matting-head``) whose ``func`` runs it. Heavy imports (diffusers, accelerate) stay
inside those modules' ``run`` so the CLI starts without them.
"""

from __future__ import annotations

import importlib
import pkgutil

from ... import py as core


def train_modules() -> list[str]:
    return sorted(f"{core.__name__}.{m.name}" for m in pkgutil.iter_modules(core.__path__)
                  if m.name.startswith("train_"))


def register(sub) -> None:
    p = sub.add_parser("train", help="train matting models (matting-head, ...)",
                       description="Training toolkits. Each model has its own sub-command; "
                                   "`diffusion-matting train MODEL --help` lists its options.")
    models = p.add_subparsers(dest="train_model", metavar="MODEL")
    for name in train_modules():
        importlib.import_module(name).register_train(models)

    def no_model(args) -> int:
        p.print_help()
        return 2

    p.set_defaults(func=no_model)
