"""Fleet commands: signed scatter-gather jobs and their history."""
