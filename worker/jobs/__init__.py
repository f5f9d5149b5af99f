"""The job, without Celery: its contract, its record, its steps (create, submit, poll, fetch), its
outcomes and the sweeper that re-drives it. Tasks in :mod:`tasks` translate these into Celery terms."""
