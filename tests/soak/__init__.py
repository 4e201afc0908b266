"""The soak with faults (issue 18): real attesters against real verifiers while a driver
kills, restarts and fills what they run on; then the database and the clients' logs are
checked for anything lost, doubled or answered badly. ``driver.py`` runs it."""
