"""Running a job: the run directory and its resume protocol (rundir.py, its lock run_lock.py),
atomic and safe file I/O (io.py), process groups (dist.py), starting DDP ranks (launch.py,
rank.py), stopping cleanly when a cluster asks (preemption.py) and what follows (requeue.py),
seeding torch's generators cheaply (seed.py)."""
