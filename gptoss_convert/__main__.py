"""`python -m gptoss_convert` == the `gptoss-convert` command."""

from gptoss_convert.cli import main

main()
