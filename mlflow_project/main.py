"""Entry point `main`: train -> register -> export -> promote `candidate` (skinreg demo). The train step
logs the calibration and eval images as its run's data/calibration and data/val artifacts (--log-data),
and the export reads them back by runs:/ URI: the export run's page names them as its dataset inputs."""
from _args import run

run("demo", extra=("--log-data",))
