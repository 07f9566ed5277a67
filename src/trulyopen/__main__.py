from trulyopen.cli import main

main()
