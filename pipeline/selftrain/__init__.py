"""Self-training, one module per step: teacher.py (1), label.py (2), select.py (with pool.py,
on real pools) and merge.py (3), student.py (4; its noise is pipeline/engine/augment.py),
loop.py (5: the whole loop); stages.py runs each step as a stage of its own."""
