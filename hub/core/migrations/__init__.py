"""SQL migrations, applied in file-name order by hub.core (package data, not code)."""
