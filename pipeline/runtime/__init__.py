"""Running a job: the run directory and its resume protocol (rundir.py), atomic and safe file
I/O (io.py), process groups (dist.py), starting DDP ranks (launch.py, rank.py) and stopping
cleanly when a cluster asks (preemption.py), seeding torch's generators cheaply (seed.py)."""
