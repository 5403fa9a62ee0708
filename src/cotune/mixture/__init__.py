"""Data-mixture optimization (`cotune mixture`): which domain mixture to train on, searched with
real cotune runs under a FLOP budget — multi-fidelity multi-scale BO (Yen et al., NeurIPS 2025)
against random search and Hyperband."""
