"""One module per `dit-prune` subcommand; each exposes `add_parser(subparsers)` and `run(args)`."""

COMMANDS = ("train", "eval", "score", "prune", "run", "index")
