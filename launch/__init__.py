"""Launcher helpers: rank discovery from any launcher, Slurm hostfiles, job scripts."""
