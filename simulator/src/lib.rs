//! The bdr simulator.
