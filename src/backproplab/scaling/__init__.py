"""Scaling-law fits on stored runs (issue 5): the loss-compute frontier, the Chinchilla form
L(N, D) = E + A/N^alpha + B/D^beta with the compute-optimal allocation (and its repeated-data
form, D replaced by an effective D for runs of several epochs), IsoFLOP profiles,
the best learning rate per budget, an extrapolation check, all with bootstrap 95%
intervals; synthetic runs from known constants to check the fitter; PNG plots.

Numpy/scipy only (no torch). Modules: fit (frontier, Chinchilla), profiles (IsoFLOP, lr),
runs (the run table, the store reader), synthetic, report (fit_report), plots.
"""
from .fit import (HUBER_DELTA, ChinchillaFit, allocation, chinchilla_objective, chinchilla_log_pred,
                  fit_chinchilla, frontier, frontier_indices, huber, log_effective_data, repeats)
from .profiles import best_lr_table, isoflop_profiles
from .report import compare_frontiers, extrapolation_check, fit_report, flops_model, jsonable
from .runs import Runs, as_runs, best_per_cell, load_runs_from_store
from .synthetic import BESIROGLU, DEFAULT_NOISE, HOFFMANN, check_synthetic, synthetic_runs

__all__ = ["HUBER_DELTA", "ChinchillaFit", "allocation", "chinchilla_objective", "chinchilla_log_pred",
           "fit_chinchilla", "frontier", "frontier_indices", "huber", "log_effective_data", "repeats",
           "best_lr_table", "isoflop_profiles",
           "compare_frontiers", "extrapolation_check", "fit_report", "flops_model", "jsonable", "Runs",
           "as_runs", "best_per_cell", "load_runs_from_store", "BESIROGLU", "DEFAULT_NOISE", "HOFFMANN",
           "check_synthetic", "synthetic_runs"]
