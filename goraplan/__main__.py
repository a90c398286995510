from goraplan.cli import main

main()
