"""Data-parallel training, framework-free: the plan, the workers' processes, rendezvous, failures."""
