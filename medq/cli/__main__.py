"""``python -m medq.cli``: the bench and the demo start workers this way."""

from medq.cli import main

main()
