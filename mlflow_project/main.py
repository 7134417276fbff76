"""Entry point `main`: train -> register -> export -> promote `candidate` (skinreg demo)."""
from _args import run

run("demo")
