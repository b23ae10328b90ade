"""kd-client's exit codes (README "Exit codes"), shared by its subcommand modules."""

EXIT_OK, EXIT_FAILED, EXIT_NOT_PUBLISHED, EXIT_STOPPED, EXIT_SPOOLED, EXIT_CONFIG = 0, 1, 3, 4, 75, 78
