from kvrank.cli import main

main()
