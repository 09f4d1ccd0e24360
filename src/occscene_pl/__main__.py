from occscene_pl.cli import main

main()
