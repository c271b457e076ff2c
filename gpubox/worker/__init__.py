"""The worker: runs jobs as Docker containers on this box's GPUs, talks to the coordinator."""
