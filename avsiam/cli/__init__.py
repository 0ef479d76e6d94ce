"""The ``avsiam`` command line: one program, one subcommand per task."""
