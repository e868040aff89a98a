"""Searches on Optuna: search spaces (space.py), studies with slots, storage and worker
processes (study.py: run_study, run_workers, enqueue_grid), the hyperparameter search on the
one engine (hpo.py). Optuna, SQLAlchemy and psycopg are imported only when a search runs."""
