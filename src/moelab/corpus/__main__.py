"""``python -m moelab.corpus``: regenerate the course corpus (see :func:`moelab.corpus.main`)."""
from . import main

main()
