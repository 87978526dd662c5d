//! The bdr node: cluster logic written against an environment (network, clock, stores, RNG).
