from medvit.cli import main

main()
