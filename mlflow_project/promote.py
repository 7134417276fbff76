"""Entry point `promote`: skinreg promote."""
from _args import run

run("promote", flags=("stages",))
