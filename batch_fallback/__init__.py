"""The batch fallback: a durable job queue for full-quality renders beside the real-time loop.

`service.BatchService` is the front door (create, inspect, cancel, progress); `store.JobStore` keeps
every job in a SQL database; `queues` hands job ids to workers (in-process over the database, or
Dramatiq over Redis); `worker.JobExecutor` runs one job; `kinds` defines what a job can be.
"""
