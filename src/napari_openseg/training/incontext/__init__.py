"""Training the in-context network: synthetic and real tasks, episodes, the trainer."""
