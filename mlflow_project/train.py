"""Entry point `train`: train on the demo data and register a PyTorch version (skinreg train --register-as)."""
from _args import run

run("train")
