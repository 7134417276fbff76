"""The `skinreg` command line (`main`) and `skinreg benchmark` (`benchmark`)."""
