"""`python -m skinreg`: the CLI (the benchmark runs it this way, as a user runs `skinreg`)."""

from skinreg.cli.main import main

main()
