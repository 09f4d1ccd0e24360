"""``python -m occscene_pl``: the ``occscene-pl`` command line (:func:`occscene_pl.cli.main`)."""

from occscene_pl.cli import main

main()
