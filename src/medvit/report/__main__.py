"""``python -m medvit.report DIR ...``."""

from medvit.report import main

main()
