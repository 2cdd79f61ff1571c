"""``python -m medvit.cv ...`` is ``medvit cv ...``."""

from medvit.cv import main

main()
