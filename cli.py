from automla.cli import main

main()
